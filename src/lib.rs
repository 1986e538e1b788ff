//! `outbound`: sends a support platform's email replies from each tenant's own verified
//! domain. Requests arrive on RabbitMQ; each is checked against PostgreSQL, composed,
//! DKIM-signed, relayed over SMTP, and its result is published back to RabbitMQ.

pub mod address;
pub mod broker;
pub mod changes;
pub mod cli;
pub mod compose;
pub mod configuration;
pub mod demo;
pub mod diagnose;
pub mod dkim;
pub mod dns;
pub mod domains;
pub mod governance;
pub mod http;
pub mod onboarding;
pub mod outcome;
pub mod relay;
pub mod request;
pub mod retry;
pub mod revalidation;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod worker;
