//! The Docker Engine as the pod source: lists a compose project's replica containers,
//! follows their events, re-inspects the ones that change and keeps the service's
//! EndpointSlice in the hub current. The only module that talks to Docker.

mod client;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

pub use self::client::{Client, DockerError};
use crate::hub::Hub;
use crate::replica::{self, NODE_LABEL, Replica, Selection, ServicePort, Skip};

/// What to watch and what to publish.
#[derive(Debug, Clone)]
pub struct Source {
    /// Compose project: its label `com.docker.compose.project` marks the cluster.
    pub project: String,
    pub selection: Selection,
    pub service: String,
    pub namespace: String,
    pub port: ServicePort,
}

/// What a container event means for its endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// SIGTERM (or SIGINT) was sent, or a stop: the endpoint is terminating from now
    /// on, before the container stops; then re-inspect.
    Terminating,
    /// A new run of the container: not terminating any more; then re-inspect.
    Started,
    /// Something Docker reports in `inspect` changed (health, death, removal, ...).
    Reinspect,
}

/// Actions whose events are asked for; exec_* (a healthcheck every second) are not.
const EVENTS: &[&str] =
    &["start", "restart", "die", "stop", "kill", "pause", "unpause", "destroy", "rename", "health_status"];

/// Follows Docker forever. When Docker is unreachable or the event stream breaks,
/// says so once and retries every second, keeping the last slice it published (an API
/// server keeps its endpoints while the controller is away).
pub async fn follow(client: Client, source: Source, hub: Arc<Hub>) {
    let mut replicas = BTreeMap::new();
    let mut failing = false;
    loop {
        match session(&client, &source, &hub, &mut replicas, &mut failing).await {
            Ok(()) => tracing::warn!("Docker's event stream ended; listing again"),
            Err(e) if !failing => tracing::warn!(
                socket = %client.socket().display(),
                error = %e,
                "Docker unreachable; serving the last known endpoints and retrying every second"
            ),
            Err(e) => tracing::debug!(error = %e, "Docker still unreachable"),
        }
        failing = true;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// One connection's worth: subscribe to events first (so none falls between), list and
/// inspect the replicas, publish, then apply events until the stream ends.
async fn session(
    client: &Client,
    source: &Source,
    hub: &Hub,
    replicas: &mut BTreeMap<String, Replica>,
    failing: &mut bool,
) -> Result<(), DockerError> {
    let mut events = client.events(&source.project, EVENTS).await?;
    let fresh = list(client, source, replicas).await?;
    for (id, replica) in &fresh {
        log_transition(replicas.get(id), Some(replica));
    }
    for (_, gone) in replicas.iter().filter(|(id, _)| !fresh.contains_key(*id)) {
        log_transition(Some(gone), None);
    }
    *replicas = fresh;
    publish(source, hub, replicas);
    hub.mark_synced();
    *failing = false;
    tracing::info!(project = %source.project, replicas = replicas.len(), "Listed replicas from Docker");
    while let Some(event) = events.next().await? {
        if let Some((id, action)) = classify(&event) {
            tracing::debug!(id = short(id), ?action, event = %event["Action"], "Container event");
            apply(client, source, hub, replicas, id, action).await?;
        }
    }
    Ok(())
}

/// Every replica now running; a terminating mark carries over to the same run only.
async fn list(
    client: &Client,
    source: &Source,
    known: &BTreeMap<String, Replica>,
) -> Result<BTreeMap<String, Replica>, DockerError> {
    let mut fresh = BTreeMap::new();
    for id in client.list(&source.project, NODE_LABEL).await? {
        if let Some(mut replica) = inspect(client, source, &id).await? {
            replica.terminating = known.get(&id).is_some_and(|r| r.terminating && r.started_at == replica.started_at);
            fresh.insert(id, replica);
        }
    }
    Ok(fresh)
}

/// Applies one container event: a terminating mark is published at once, then the
/// container is inspected again for everything else.
async fn apply(
    client: &Client,
    source: &Source,
    hub: &Hub,
    replicas: &mut BTreeMap<String, Replica>,
    id: &str,
    action: Action,
) -> Result<(), DockerError> {
    if action == Action::Terminating
        && let Some(replica) = replicas.get_mut(id)
        && !replica.terminating
    {
        let before = replica.clone();
        replica.terminating = true;
        log_transition(Some(&before), Some(replica));
        publish(source, hub, replicas);
    }
    let before = replicas.get(id).cloned();
    match inspect(client, source, id).await? {
        Some(mut replica) => {
            replica.terminating = action != Action::Started
                && before.as_ref().is_some_and(|r| r.terminating && r.started_at == replica.started_at);
            replicas.insert(id.to_owned(), replica)
        }
        None => replicas.remove(id),
    };
    log_transition(before.as_ref(), replicas.get(id));
    publish(source, hub, replicas);
    Ok(())
}

/// The replica in a container, or `None` when it is not one (any more).
async fn inspect(client: &Client, source: &Source, id: &str) -> Result<Option<Replica>, DockerError> {
    let Some(json) = client.inspect(id).await? else {
        return Ok(None);
    };
    match Replica::from_inspect(&json, &source.selection) {
        Ok(replica) => Ok(Some(replica)),
        Err(skip @ Skip::NoAddress(_)) => {
            tracing::info!(id = short(id), reason = %skip, "Replica container has no endpoint");
            Ok(None)
        }
        Err(skip) => {
            tracing::trace!(id = short(id), reason = %skip, "Not an endpoint");
            Ok(None)
        }
    }
}

fn publish(source: &Source, hub: &Hub, replicas: &BTreeMap<String, Replica>) {
    let slice = replica::endpoint_slice(&source.service, &source.namespace, &source.port, replicas.values());
    if let Some(change) = hub.put(slice) {
        tracing::debug!(version = change.version(), endpoints = replicas.len(), "Slice updated");
    }
}

/// Reads a container event: its id and what it means; `None` for other events.
pub fn classify(event: &Value) -> Option<(&str, Action)> {
    if event.get("Type").and_then(Value::as_str) != Some("container") {
        return None;
    }
    let id = event.pointer("/Actor/ID").and_then(Value::as_str)?;
    let action = event.get("Action").and_then(Value::as_str)?;
    let signal = event.pointer("/Actor/Attributes/signal").and_then(Value::as_str).unwrap_or_default();
    let action = match action {
        "stop" => Action::Terminating,
        "kill" if matches!(signal, "15" | "2" | "SIGTERM" | "SIGINT" | "TERM" | "INT") => Action::Terminating,
        "start" => Action::Started,
        other if EVENTS.contains(&other) || other.starts_with("health_status") => Action::Reinspect,
        _ => return None,
    };
    Some((id, action))
}

fn log_transition(before: Option<&Replica>, after: Option<&Replica>) {
    match (before, after) {
        (None, Some(r)) => {
            let c = r.conditions();
            tracing::info!(pod = %r.pod, node = %r.node, ip = %r.ip, ready = c.ready, "Adding endpoint");
        }
        (Some(r), None) => tracing::info!(pod = %r.pod, node = %r.node, ip = %r.ip, "Removing endpoint"),
        (Some(old), Some(r)) if old.conditions() != r.conditions() || old.ip != r.ip => {
            let c = r.conditions();
            tracing::info!(
                pod = %r.pod, node = %r.node, ip = %r.ip,
                ready = c.ready, serving = c.serving, terminating = c.terminating,
                "Endpoint changed"
            );
        }
        _ => {}
    }
}

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Events Docker 20.10 sent (the first of each action) while a compose replica was
    /// stopped (`docker stop`: kill with signal 15, die, stop), another created and
    /// started, and both became healthy.
    const EVENTS_JSON: &str = include_str!("../tests/data/events-stop.jsonl");

    fn events() -> Vec<Value> {
        EVENTS_JSON.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    #[test]
    fn sigterm_and_stop_mean_terminating() {
        let actions: Vec<(String, Option<Action>)> =
            events().iter().map(|e| (e["Action"].as_str().unwrap().to_owned(), classify(e).map(|(_, a)| a))).collect();
        for (action, classified) in &actions {
            let expected = match action.as_str() {
                "kill" | "stop" => Some(Action::Terminating),
                "start" => Some(Action::Started),
                "die" => Some(Action::Reinspect),
                a if a.starts_with("health_status") => Some(Action::Reinspect),
                _ => None,
            };
            assert_eq!(*classified, expected, "{action}");
        }
        assert!(actions.iter().any(|(a, _)| a == "kill"), "the capture has a kill");
    }

    #[test]
    fn other_signals_and_execs_are_not_terminating() {
        let mut kill = events().into_iter().find(|e| e["Action"] == "kill").unwrap();
        kill["Actor"]["Attributes"]["signal"] = "10".into();
        assert_eq!(classify(&kill).map(|(_, a)| a), Some(Action::Reinspect));
        kill["Action"] = "exec_start: /app health-check".into();
        assert_eq!(classify(&kill), None);
        kill["Type"] = "network".into();
        assert_eq!(classify(&kill), None);
    }
}
