//! The kube-apiserver's audit log in the local world: every write (create,
//! update, patch, delete, deletecollection) of every resource at Metadata
//! level — who (user, userAgent), what (verb, objectRef), when
//! (requestReceivedTimestamp, stageTimestamp) and how it ended (the response
//! code) — and nothing for reads. Written as JSON lines to
//! `<world>/logs/audit.log`, so that tests can count who wrote what and
//! when, e.g. to show that two operators never wrote at the same time.

use std::path::Path;

use k8s_openapi::jiff::Timestamp;
use serde::Deserialize;

use crate::error::{Error, Result, io_err};

/// The audit policy of the local world.
pub const POLICY: &str = "\
apiVersion: audit.k8s.io/v1
kind: Policy
# One event per request, when its response is complete.
omitStages: [RequestReceived, ResponseStarted]
rules:
- level: Metadata
  verbs: [create, update, patch, delete, deletecollection]
- level: None
";

/// The audit log's file name in the world's logs directory.
pub const LOG_NAME: &str = "audit.log";

/// One audited request.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    /// The request's id.
    #[serde(rename = "auditID")]
    pub audit_id: String,
    /// create, update, patch, delete, deletecollection.
    pub verb: String,
    /// Who.
    pub user: User,
    /// The client's User-Agent header.
    #[serde(default)]
    pub user_agent: String,
    /// What.
    #[serde(default)]
    pub object_ref: Option<ObjectRef>,
    /// How it ended.
    #[serde(default)]
    pub response_status: Option<ResponseStatus>,
    /// When the API server began handling it (RFC 3339).
    pub request_received_timestamp: String,
    /// When its response was complete (RFC 3339).
    pub stage_timestamp: String,
}

/// The authenticated user.
#[derive(Debug, Clone, Deserialize)]
pub struct User {
    /// e.g. system:serviceaccount:strata-system:strata-operator.
    #[serde(default)]
    pub username: String,
}

/// The object written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectRef {
    /// Resource (plural), e.g. pods, models, leases.
    #[serde(default)]
    pub resource: String,
    /// Namespace, if namespaced.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Name, if one object.
    #[serde(default)]
    pub name: Option<String>,
    /// API group ("" for core).
    #[serde(default)]
    pub api_group: Option<String>,
    /// Subresource, e.g. status.
    #[serde(default)]
    pub subresource: Option<String>,
}

/// The response.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ResponseStatus {
    /// HTTP status code.
    #[serde(default)]
    pub code: Option<u16>,
}

impl Event {
    /// When it was received.
    pub fn received(&self) -> Option<Timestamp> {
        self.request_received_timestamp.parse().ok()
    }

    /// When it completed.
    pub fn completed(&self) -> Option<Timestamp> {
        self.stage_timestamp.parse().ok()
    }

    /// Whether the write took effect (a 2xx answer).
    pub fn succeeded(&self) -> bool {
        self.response_status
            .as_ref()
            .and_then(|r| r.code)
            .is_some_and(|c| (200..300).contains(&c))
    }

    /// `verb resource[/subresource] namespace/name`, for messages.
    pub fn describe(&self) -> String {
        let o = self.object_ref.clone().unwrap_or_default();
        let sub = o.subresource.map(|s| format!("/{s}")).unwrap_or_default();
        format!(
            "{} {} {}{} {}/{} by {} at {} ({})",
            self.request_received_timestamp,
            self.verb,
            o.resource,
            sub,
            o.namespace.unwrap_or_default(),
            o.name.unwrap_or_default(),
            self.user.username,
            self.stage_timestamp,
            self.response_status
                .as_ref()
                .and_then(|r| r.code)
                .map_or("no code".into(), |c| c.to_string())
        )
    }
}

/// Parses audit log text (one JSON event per line). A last line still being
/// written is skipped; any other line that does not parse is an error.
pub fn parse(text: &str) -> Result<Vec<Event>> {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut events = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        match serde_json::from_str::<Event>(line) {
            Ok(e) => events.push(e),
            Err(_) if i + 1 == lines.len() && !text.ends_with('\n') => {}
            Err(e) => {
                return Err(Error::Serialize {
                    what: format!("audit log line {}", i + 1),
                    reason: e.to_string(),
                });
            }
        }
    }
    Ok(events)
}

/// Reads an audit log.
pub fn read(path: &Path) -> Result<Vec<Event>> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    parse(&text)
}

/// Writes of `old` that the API server received at or after `new`'s first
/// write was received: with one writer at any moment, none (pure). Only
/// writes that took effect count; `old`'s refused writes (a 409 on a lease
/// someone else holds) change nothing.
pub fn writes_after_handover<'a>(events: &'a [Event], old: &str, new: &str) -> Vec<&'a Event> {
    let first_new = events
        .iter()
        .filter(|e| e.user.username == new && e.succeeded())
        .filter_map(Event::received)
        .min();
    let Some(first_new) = first_new else {
        return Vec::new();
    };
    events
        .iter()
        .filter(|e| e.user.username == old && e.succeeded())
        .filter(|e| e.received().is_some_and(|t| t >= first_new))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(user: &str, verb: &str, resource: &str, received: &str, code: u16) -> String {
        serde_json::json!({
            "kind": "Event", "apiVersion": "audit.k8s.io/v1", "level": "Metadata",
            "auditID": format!("{user}-{received}"), "stage": "ResponseComplete",
            "requestURI": "/x", "verb": verb,
            "user": {"username": user, "groups": ["system:authenticated"]},
            "sourceIPs": ["127.0.0.1"], "userAgent": "strata-operator/0.1",
            "objectRef": {"resource": resource, "namespace": "ns", "name": "n", "apiVersion": "v1"},
            "responseStatus": {"metadata": {}, "code": code},
            "requestReceivedTimestamp": received,
            "stageReceivedTimestamp": received,
            "stageTimestamp": received,
        })
        .to_string()
    }

    #[test]
    fn parses_events_and_skips_only_a_partial_last_line() {
        let text = format!(
            "{}\n{}\n{{\"kind\":\"Ev",
            line("a", "update", "leases", "2026-01-01T00:00:01.000000Z", 200),
            line("b", "patch", "models", "2026-01-01T00:00:02.500000Z", 409),
        );
        let events = parse(&text).expect("parse");
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].user.username, "a");
        assert_eq!(events[0].user_agent, "strata-operator/0.1");
        assert!(events[0].succeeded() && !events[1].succeeded());
        assert_eq!(
            events[1].object_ref.as_ref().map(|o| o.resource.as_str()),
            Some("models")
        );
        assert!(events[1].received() > events[0].received());
        assert!(events[0].describe().contains("update leases ns/n by a"));
        let broken = format!(
            "{{oops\n{}\n",
            line("a", "update", "leases", "2026-01-01T00:00:01Z", 200)
        );
        assert!(
            parse(&broken).is_err(),
            "a broken line before the end is an error"
        );
    }

    #[test]
    fn finds_writes_of_the_old_writer_after_the_new_one_began() {
        let t = |s: u32| format!("2026-01-01T00:00:{s:02}.000000Z");
        let text = [
            line("old", "update", "leases", &t(1), 200),
            line("old", "patch", "models", &t(2), 200),
            line("new", "update", "leases", &t(3), 409), // refused: not a write
            line("new", "update", "leases", &t(5), 200), // the handover
            line("old", "update", "leases", &t(6), 409), // refused: fine
            line("new", "patch", "models", &t(7), 200),
        ]
        .join("\n");
        let events = parse(&text).expect("parse");
        assert!(writes_after_handover(&events, "old", "new").is_empty());
        let late = format!("{text}\n{}", line("old", "patch", "models", &t(8), 200));
        let events = parse(&late).expect("parse");
        let bad = writes_after_handover(&events, "old", "new");
        assert_eq!(bad.len(), 1);
        assert!(
            bad[0].describe().contains("patch models"),
            "{}",
            bad[0].describe()
        );
        // No write by the new one: nothing to compare with.
        assert!(writes_after_handover(&events, "old", "nobody").is_empty());
    }
}
