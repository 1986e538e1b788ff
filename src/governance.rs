//! Checks 3 and 4: tenant restrictions, suppressions, and the conditions an automated
//! reply must meet. The decision is a pure function of state read from PostgreSQL when
//! the message is checked, never from a cache.

use chrono::{DateTime, Utc};

use crate::outcome::Reason;
use crate::request::{Origin, SendRequest};

/// Automated messages to one recipient in one conversation that may go out within
/// [`LOOP_WINDOW_HOURS`]; one more is a reply loop.
pub const LOOP_MAX_MESSAGES: i64 = 3;
pub const LOOP_WINDOW_HOURS: i64 = 24;

/// An active restriction that applies to the request's origin.
#[derive(Debug, Clone)]
pub struct Restriction {
    pub detector: String,
    pub scope: String,
}

#[derive(Debug, Clone)]
pub struct Automation {
    pub mode: String,
    pub shadow_validated: bool,
    pub readiness_score: f64,
    pub readiness_threshold: f64,
    pub revalidated_at: Option<DateTime<Utc>>,
    pub revalidation_interval_days: i32,
}

/// The governance state of one request, read in one pass.
#[derive(Debug, Clone, Default)]
pub struct GovernanceState {
    pub restriction: Option<Restriction>,
    pub suppressed_recipient: Option<String>,
    pub kill_switch: bool,
    pub automation_paused: bool,
    pub automation: Option<Automation>,
    /// Most automated messages already sent to any one of the request's recipients in
    /// this conversation within the loop window.
    pub recent_automated_messages: i64,
    /// The database time at which the automation conditions were read.
    pub checked_at: Option<DateTime<Utc>>,
}

/// The decision of the governance checks.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Send,
    /// Compose and sign, keep for review, send nothing.
    Shadow,
    Block(Reason, String),
}

/// Applies checks 3 and 4 in the contract's order; the first failing check decides.
pub fn decide(request: &SendRequest, state: &GovernanceState, now: DateTime<Utc>) -> Verdict {
    if let Some(restriction) = &state.restriction {
        return Verdict::Block(
            Reason::TenantRestricted,
            format!(
                "The tenant is restricted for {} sending by the {} detector; an operator can review it with `outbound tenant restrictions list`.",
                restriction.scope, restriction.detector
            ),
        );
    }
    if let Some(address) = &state.suppressed_recipient {
        return Verdict::Block(
            Reason::RecipientSuppressed,
            format!("Recipient {address} is on the tenant's suppression list, so nothing was sent; remove the address from the request or the list."),
        );
    }
    if request.origin == Origin::Agent {
        return Verdict::Send;
    }

    if state.kill_switch {
        return Verdict::Block(Reason::KillSwitchActive, "The platform kill switch for automated sending is on; automated replies wait until an operator turns it off.".into());
    }
    if state.automation_paused {
        return Verdict::Block(Reason::AutomationPaused, "Automated replies are paused for this tenant; its owner can resume them with `outbound settings set automation_paused=false`.".into());
    }
    let Some(automation) = &state.automation else {
        return Verdict::Block(
            Reason::AutomationNotFound,
            format!(
                "Automation {} does not exist for this tenant; create it with `outbound automation create` or fix automation_id.",
                request.automation_id.map(|id| id.to_string()).unwrap_or_default()
            ),
        );
    };
    if automation.mode == "shadow" {
        return Verdict::Shadow;
    }
    if !automation.shadow_validated {
        return Verdict::Block(
            Reason::ShadowValidationMissing,
            "The automation is live but has not passed shadow validation; review its shadowed messages, then `outbound automation set ... shadow_validated=true`.".into(),
        );
    }
    if automation.readiness_score < automation.readiness_threshold {
        return Verdict::Block(
            Reason::ReadinessBelowThreshold,
            format!(
                "The automation's readiness score {:.2} is below its threshold {:.2}.",
                automation.readiness_score, automation.readiness_threshold
            ),
        );
    }
    let interval = chrono::Duration::days(i64::from(automation.revalidation_interval_days));
    let revalidated_in_time = automation.revalidated_at.is_some_and(|at| now - at <= interval);
    if !revalidated_in_time {
        return Verdict::Block(
            Reason::RevalidationOverdue,
            format!(
                "The automation was last revalidated {}, more than {} days ago; revalidate it, then `outbound automation set ... revalidated=now`.",
                automation.revalidated_at.map(|at| at.to_rfc3339()).unwrap_or_else(|| "never".into()),
                automation.revalidation_interval_days
            ),
        );
    }
    if let Some(parent) = request.parent_auto_submitted.as_deref().filter(|value| !value.trim().eq_ignore_ascii_case("no")) {
        return Verdict::Block(
            Reason::AutoReplyLoop,
            format!("The message this replies to was itself automated (Auto-Submitted: {parent}), so an automated reply could start a loop."),
        );
    }
    if state.recent_automated_messages >= LOOP_MAX_MESSAGES {
        return Verdict::Block(
            Reason::AutoReplyLoop,
            format!(
                "{} automated messages already went to this recipient in this conversation within {LOOP_WINDOW_HOURS} hours; a person should answer.",
                state.recent_automated_messages
            ),
        );
    }
    Verdict::Send
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::configuration::LimitSettings;

    fn request(origin: &str) -> SendRequest {
        let mut value = serde_json::json!({
            "schema": "outbound.send_request.v1",
            "request_id": "0b6f3c1e-5a4d-4c1b-9a57-2f0e8d6c9a11",
            "tenant_id": "7d2b9c44-1f3e-4a8b-b6d1-0c9e5f4a2b73",
            "origin": origin,
            "conversation_id": "conv-1",
            "from": {"address": "support@yourstore.example"},
            "to": [{"address": "jamie@customer.example"}],
            "subject": "Hi",
            "text_body": "Hello"
        });
        if origin == "automation" {
            value["automation_id"] = "a3f1c9e2-6d4b-4a7e-8f0c-2b1d9e8a7c6b".into();
        }
        let limits = LimitSettings { max_recipients: 50, max_message_size: 1 << 20, max_metadata_size: 4096 };
        crate::request::parse(value.to_string().as_bytes(), &limits).unwrap()
    }

    fn live() -> GovernanceState {
        GovernanceState {
            automation: Some(Automation {
                mode: "live".into(),
                shadow_validated: true,
                readiness_score: 0.9,
                readiness_threshold: 0.8,
                revalidated_at: Some(Utc::now()),
                revalidation_interval_days: 30,
            }),
            ..GovernanceState::default()
        }
    }

    fn reason(verdict: Verdict) -> Option<Reason> {
        match verdict {
            Verdict::Block(reason, _) => Some(reason),
            _ => None,
        }
    }

    #[test]
    fn agent_ignores_automation_conditions() {
        let state = GovernanceState { kill_switch: true, ..GovernanceState::default() };
        assert_eq!(decide(&request("agent"), &state, Utc::now()), Verdict::Send);
    }

    #[test]
    fn live_automation_passing_sends() {
        assert_eq!(decide(&request("automation"), &live(), Utc::now()), Verdict::Send);
    }

    #[test]
    fn each_condition_blocks_with_its_reason() {
        let automation = request("automation");
        let now = Utc::now();
        let cases: Vec<(GovernanceState, Reason)> = vec![
            (GovernanceState { restriction: Some(Restriction { detector: "volume_spike".into(), scope: "all".into() }), ..live() }, Reason::TenantRestricted),
            (GovernanceState { suppressed_recipient: Some("jamie@customer.example".into()), ..live() }, Reason::RecipientSuppressed),
            (GovernanceState { kill_switch: true, ..live() }, Reason::KillSwitchActive),
            (GovernanceState { automation_paused: true, ..live() }, Reason::AutomationPaused),
            (GovernanceState { automation: None, ..live() }, Reason::AutomationNotFound),
            (GovernanceState { recent_automated_messages: 3, ..live() }, Reason::AutoReplyLoop),
        ];
        for (state, expected) in cases {
            assert_eq!(reason(decide(&automation, &state, now)), Some(expected));
        }

        let mut state = live();
        state.automation.as_mut().unwrap().shadow_validated = false;
        assert_eq!(reason(decide(&automation, &state, now)), Some(Reason::ShadowValidationMissing));
        let mut state = live();
        state.automation.as_mut().unwrap().readiness_score = 0.5;
        assert_eq!(reason(decide(&automation, &state, now)), Some(Reason::ReadinessBelowThreshold));
        let mut state = live();
        state.automation.as_mut().unwrap().revalidated_at = Some(now - chrono::Duration::days(31));
        assert_eq!(reason(decide(&automation, &state, now)), Some(Reason::RevalidationOverdue));
        let mut state = live();
        state.automation.as_mut().unwrap().mode = "shadow".into();
        assert_eq!(decide(&automation, &state, now), Verdict::Shadow);
    }

    #[test]
    fn parent_auto_submitted_is_a_loop() {
        let mut automation = request("automation");
        automation.parent_auto_submitted = Some("auto-replied".into());
        assert_eq!(reason(decide(&automation, &live(), Utc::now())), Some(Reason::AutoReplyLoop));
        automation.parent_auto_submitted = Some("no".into());
        assert_eq!(decide(&automation, &live(), Utc::now()), Verdict::Send);
    }

    #[test]
    fn first_failing_check_decides() {
        let state = GovernanceState { kill_switch: true, automation_paused: true, automation: None, ..GovernanceState::default() };
        assert_eq!(reason(decide(&request("automation"), &state, Utc::now())), Some(Reason::KillSwitchActive));
        let suppressed_and_killed = GovernanceState { suppressed_recipient: Some("x@y.example".into()), kill_switch: true, ..live() };
        assert_eq!(reason(decide(&request("automation"), &suppressed_and_killed, Utc::now())), Some(Reason::RecipientSuppressed));
    }
}
