//! Hands signed messages to the SMTP relay and reports its reply for each recipient.
//!
//! lettre's high-level transport stops at the first rejected recipient, so this module
//! drives lettre's SMTP connection command by command: one MAIL, one RCPT per
//! recipient, DATA for the accepted ones. Every step runs under `smtp.timeout`.

use std::future::Future;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, TlsParameters};
use lettre::transport::smtp::commands::{Data, Mail, Rcpt, Rset};
use lettre::transport::smtp::extension::{ClientId, Extension, MailBodyParameter, MailParameter};
use tokio::sync::{Mutex, Semaphore};

use crate::address::Address;
use crate::configuration::{SmtpSettings, SmtpTarget, TlsMode};
use crate::outcome::{RecipientOutcome, RecipientStatus};

/// The outcome of one delivery attempt for each recipient it tried.
#[derive(Debug, Clone)]
pub struct RelayReport {
    pub recipients: Vec<RecipientOutcome>,
    /// True when the relay could not be reached or timed out, as opposed to replying 4xx.
    pub unavailable: bool,
    /// One sentence on a failure of the whole transaction, if there was one.
    pub failure: Option<String>,
}

pub struct Relay {
    target: SmtpTarget,
    timeout: Duration,
    hello: ClientId,
    idle: Mutex<Vec<AsyncSmtpConnection>>,
    connections: Semaphore,
    max_idle: usize,
    rate: Option<DefaultDirectRateLimiter>,
}

/// A failed SMTP step: the reply code if the relay sent one, and the reply or error text.
struct StepError {
    code: Option<u16>,
    message: String,
    unavailable: bool,
}

impl Relay {
    pub fn new(target: SmtpTarget, settings: &SmtpSettings) -> Arc<Self> {
        let rate = NonZeroU32::new(settings.max_per_second).map(|per_second| RateLimiter::direct(Quota::per_second(per_second)));
        Arc::new(Relay {
            target,
            timeout: settings.timeout,
            hello: ClientId::Domain(settings.hello_name.clone()),
            idle: Mutex::new(Vec::new()),
            connections: Semaphore::new(settings.max_connections),
            max_idle: settings.max_connections,
            rate,
        })
    }

    /// Delivers `message` to `recipients`, returning the relay's reply for each.
    pub async fn deliver(&self, request_id: &str, sender: &Address, recipients: &[Address], message: &[u8]) -> RelayReport {
        if let Some(rate) = &self.rate {
            rate.until_ready().await;
        }
        let started = Instant::now();
        let report = match &self.target {
            SmtpTarget::Directory(dir) => write_to_directory(dir, request_id, recipients, message).await,
            SmtpTarget::Relay { .. } => self.deliver_smtp(sender, recipients, message).await,
        };
        metrics::histogram!(crate::telemetry::SMTP_DURATION).record(started.elapsed().as_secs_f64());
        report
    }

    async fn deliver_smtp(&self, sender: &Address, recipients: &[Address], message: &[u8]) -> RelayReport {
        let _permit = self.connections.acquire().await.expect("the semaphore is never closed");
        let mut connection = match self.checkout().await {
            Ok(connection) => connection,
            Err(err) => return whole_failure(recipients, err, RecipientStatus::Deferred),
        };

        let (report, reusable) = self.transaction(&mut connection, sender, recipients, message).await;
        if reusable && !connection.has_broken() {
            let mut idle = self.idle.lock().await;
            if idle.len() < self.max_idle {
                idle.push(connection);
                return report;
            }
        }
        // Best effort: a connection that is not kept is closed without waiting long.
        let _ = tokio::time::timeout(Duration::from_secs(1), connection.quit()).await;
        report
    }

    /// Takes an idle connection that still accepts RSET, or opens a new one.
    async fn checkout(&self) -> Result<AsyncSmtpConnection, StepError> {
        loop {
            let candidate = self.idle.lock().await.pop();
            let Some(mut connection) = candidate else { break };
            if self.step(connection.command(Rset)).await.is_ok() {
                return Ok(connection);
            }
            connection.abort().await;
        }
        self.connect().await
    }

    async fn connect(&self) -> Result<AsyncSmtpConnection, StepError> {
        let SmtpTarget::Relay { host, port, tls, credentials } = &self.target else {
            unreachable!("connect is only called for an SMTP target")
        };
        let tls_parameters = || {
            TlsParameters::new(host.clone()).map_err(|err| StepError {
                code: None,
                message: format!("TLS setup for {host} failed: {err}"),
                unavailable: true,
            })
        };
        let implicit_tls = if *tls == TlsMode::Required { Some(tls_parameters()?) } else { None };
        let mut connection = self
            .step(AsyncSmtpConnection::connect_tokio1((host.as_str(), *port), Some(self.timeout), &self.hello, implicit_tls, None))
            .await?;
        if *tls == TlsMode::Starttls {
            let parameters = tls_parameters()?;
            self.step(connection.starttls(parameters, &self.hello)).await?;
        }
        if let Some((user, password)) = credentials {
            let credentials = Credentials::new(user.clone(), password.clone());
            self.step(connection.auth(&[Mechanism::Plain, Mechanism::Login], &credentials)).await?;
        }
        Ok(connection)
    }

    /// Runs one SMTP step under the timeout, turning every failure into a [`StepError`].
    async fn step<T>(&self, future: impl Future<Output = Result<T, lettre::transport::smtp::Error>>) -> Result<T, StepError> {
        match tokio::time::timeout(self.timeout, future).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => Err(step_error(&err)),
            Err(_) => Err(StepError {
                code: None,
                message: format!("the relay did not respond within {}", humantime::format_duration(self.timeout)),
                unavailable: true,
            }),
        }
    }

    /// Runs MAIL, RCPT and DATA. Returns the report and whether the connection may be reused.
    async fn transaction(
        &self,
        connection: &mut AsyncSmtpConnection,
        sender: &Address,
        recipients: &[Address],
        message: &[u8],
    ) -> (RelayReport, bool) {
        let mut parameters = Vec::new();
        let needs_smtputf8 = sender.needs_smtputf8() || recipients.iter().any(Address::needs_smtputf8);
        if needs_smtputf8 {
            if !connection.server_info().supports_feature(Extension::SmtpUtfEight) {
                let err = StepError {
                    code: None,
                    message: "an address has a UTF-8 local part and the relay does not offer SMTPUTF8".into(),
                    unavailable: false,
                };
                return (whole_failure(recipients, err, RecipientStatus::Rejected), true);
            }
            parameters.push(MailParameter::SmtpUtfEight);
        }
        if !message.is_ascii() {
            parameters.push(MailParameter::Body(MailBodyParameter::EightBitMime));
        }

        let Ok(from) = lettre::Address::from_str(&sender.to_string()) else {
            let err = StepError { code: None, message: format!("sender {sender} is not accepted by the SMTP client"), unavailable: false };
            return (whole_failure(recipients, err, RecipientStatus::Rejected), true);
        };
        if let Err(err) = self.step(connection.command(Mail::new(Some(from), parameters))).await {
            let status = if err.code.is_some_and(|code| code >= 500) { RecipientStatus::Rejected } else { RecipientStatus::Deferred };
            let reusable = err.code.is_some();
            return (whole_failure(recipients, err, status), reusable);
        }

        let mut outcomes = Vec::with_capacity(recipients.len());
        for recipient in recipients {
            let answer = match lettre::Address::from_str(&recipient.to_string()) {
                Ok(address) => self.step(connection.command(Rcpt::new(address, vec![]))).await,
                Err(err) => Err(StepError { code: None, message: format!("the SMTP client rejects this address: {err}"), unavailable: false }),
            };
            match answer {
                Ok(response) => outcomes.push(outcome(recipient, RecipientStatus::Accepted, Some(u16::from(response.code())), &response.message().collect::<Vec<_>>().join(" "))),
                Err(err) if err.code.is_none() && err.unavailable => {
                    // The connection is gone, so every recipient without a reply yet is deferred.
                    let answered: Vec<String> = outcomes.iter().map(|o: &RecipientOutcome| o.address.clone()).collect();
                    for pending in recipients.iter().filter(|r| !answered.contains(&r.to_string())) {
                        outcomes.push(outcome(pending, RecipientStatus::Deferred, None, &err.message));
                    }
                    for accepted in outcomes.iter_mut().filter(|o| o.status == RecipientStatus::Accepted) {
                        accepted.status = RecipientStatus::Deferred;
                    }
                    return (RelayReport { recipients: outcomes, unavailable: true, failure: Some(err.message) }, false);
                }
                Err(err) => {
                    let status = if err.code.is_some_and(|code| code >= 500) || err.code.is_none() {
                        RecipientStatus::Rejected
                    } else {
                        RecipientStatus::Deferred
                    };
                    outcomes.push(outcome(recipient, status, err.code, &err.message));
                }
            }
        }

        if !outcomes.iter().any(|o| o.status == RecipientStatus::Accepted) {
            let reset = self.step(connection.command(Rset)).await.is_ok();
            return (RelayReport { recipients: outcomes, unavailable: false, failure: None }, reset);
        }

        // lettre ends the data with CRLF "." CRLF, whose first CRLF would add an empty
        // line to a message that already ends with CRLF, so that line end is left to it.
        let content = message.strip_suffix(b"\r\n").unwrap_or(message);
        let data = match self.step(connection.command(Data)).await {
            Ok(_) => self.step(connection.message(content)).await,
            Err(err) => Err(err),
        };
        match data {
            Ok(response) => {
                let text = response.message().collect::<Vec<_>>().join(" ");
                for accepted in outcomes.iter_mut().filter(|o| o.status == RecipientStatus::Accepted) {
                    accepted.smtp_code = Some(u16::from(response.code()));
                    accepted.enhanced_code = enhanced_code(&text);
                    accepted.smtp_message = Some(text.clone());
                }
                (RelayReport { recipients: outcomes, unavailable: false, failure: None }, true)
            }
            Err(err) => {
                let status = if err.code.is_some_and(|code| code >= 500) { RecipientStatus::Rejected } else { RecipientStatus::Deferred };
                for accepted in outcomes.iter_mut().filter(|o| o.status == RecipientStatus::Accepted) {
                    accepted.status = status;
                    accepted.smtp_code = err.code;
                    accepted.enhanced_code = enhanced_code(&err.message);
                    accepted.smtp_message = Some(err.message.clone());
                }
                let reusable = err.code.is_some();
                let failure = Some(format!("the relay answered the message data with: {}", err.message));
                (RelayReport { recipients: outcomes, unavailable: err.code.is_none(), failure }, reusable)
            }
        }
    }

    /// Closes idle connections, for a clean shutdown.
    pub async fn close(&self) {
        let connections: Vec<_> = self.idle.lock().await.drain(..).collect();
        for mut connection in connections {
            let _ = tokio::time::timeout(Duration::from_secs(1), connection.quit()).await;
        }
    }
}

fn step_error(err: &lettre::transport::smtp::Error) -> StepError {
    let code = err.status().map(u16::from);
    let message = match std::error::Error::source(err) {
        Some(source) if code.is_some() => format!("{} {}", code.unwrap_or_default(), source),
        _ => err.to_string(),
    };
    StepError { code, message, unavailable: code.is_none() }
}

fn outcome(address: &Address, status: RecipientStatus, code: Option<u16>, message: &str) -> RecipientOutcome {
    RecipientOutcome {
        address: address.to_string(),
        status,
        smtp_code: code,
        enhanced_code: enhanced_code(message),
        smtp_message: (!message.is_empty()).then(|| message.to_string()),
    }
}

/// Finds an RFC 3463 enhanced status code such as `5.1.1` in a reply text.
fn enhanced_code(text: &str) -> Option<String> {
    text.split_whitespace()
        .find(|word| {
            let parts: Vec<&str> = word.split('.').collect();
            parts.len() == 3
                && matches!(parts[0], "2" | "4" | "5")
                && parts[1..].iter().all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(str::to_string)
}

fn whole_failure(recipients: &[Address], err: StepError, status: RecipientStatus) -> RelayReport {
    RelayReport {
        recipients: recipients.iter().map(|r| outcome(r, status, err.code, &err.message)).collect(),
        unavailable: err.unavailable,
        failure: Some(err.message),
    }
}

/// Writes the signed message as `<dir>/<request_id>.eml`, the embedded default target.
async fn write_to_directory(dir: &PathBuf, request_id: &str, recipients: &[Address], message: &[u8]) -> RelayReport {
    let written = async {
        tokio::fs::create_dir_all(dir).await?;
        let temporary = dir.join(format!(".{request_id}.eml.tmp"));
        tokio::fs::write(&temporary, message).await?;
        tokio::fs::rename(&temporary, dir.join(format!("{request_id}.eml"))).await
    }
    .await;
    match written {
        Ok(()) => RelayReport {
            recipients: recipients
                .iter()
                .map(|r| outcome(r, RecipientStatus::Accepted, Some(250), "written to the message directory"))
                .collect(),
            unavailable: false,
            failure: None,
        },
        Err(err) => {
            let message = format!("writing to {} failed: {err}", dir.display());
            whole_failure(recipients, StepError { code: None, message, unavailable: true }, RecipientStatus::Deferred)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enhanced_code_found_in_reply() {
        assert_eq!(enhanced_code("5.1.1 No such user here").as_deref(), Some("5.1.1"));
        assert_eq!(enhanced_code("450 4.2.1 Mailbox busy").as_deref(), Some("4.2.1"));
        assert_eq!(enhanced_code("OK queued as 1.2"), None);
    }
}
