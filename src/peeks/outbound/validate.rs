//! OP-4: a peek answer from another server is checked like a `send_join` answer (and a
//! `send_join` answer the same way, JN-6) before any of it is stored: every PDU's signatures (by its sender's server) and hash, its `room_id`, the
//! auth rules against its own auth events, exactly one create event, one event per state key,
//! and a room that is world-readable and not encrypted.

use std::collections::{BTreeMap, HashMap};

use ruma::events::StateEventType;
use ruma::{EventId, RoomId};
use serde_json::Value;

use crate::events::intake::{self, Hashes};
use crate::events::{self, Pdu, RoomVersion};
use crate::keys::RemoteKeys;
use crate::rooms::{visibility, StateMap};

/// Why a peek answer was refused.
#[derive(Debug, thiserror::Error)]
pub enum InvalidPeek {
    #[error("room version {0:?} is not supported")]
    UnsupportedVersion(String),
    #[error("malformed answer: {0}")]
    Malformed(String),
    #[error("event {event_id}: {reason}")]
    BadEvent { event_id: String, reason: String },
    /// Valid, but the room may not be peeked (treated like a 403, OP-4.5).
    #[error("room is not peekable: {0}")]
    NotPeekable(&'static str),
}

/// A peek answer that passed every check.
#[derive(Debug)]
pub struct ValidPeek {
    pub version: RoomVersion,
    pub state: StateMap,
    /// Every event of the state and the auth chain.
    pub events: Vec<Pdu>,
    pub latest: Pdu,
    /// The recent history a target sent in `messages` (OP-4.6), checked like `latest`: the
    /// events older than `latest`, oldest (by depth) first, `latest` itself not among them.
    pub timeline: Vec<Pdu>,
    pub renewal_interval_ms: i64,
}

/// Most events of a `messages` list that are kept: the newest by depth (a target may send
/// more; older ones are left out, never stored).
pub const MAX_MESSAGES: usize = 50;

fn bad(event_id: &str, reason: impl Into<String>) -> InvalidPeek {
    InvalidPeek::BadEvent { event_id: event_id.to_owned(), reason: reason.into() }
}

/// Checks one PDU of an answer through the intake ([`crate::events::intake`]); a refusal names
/// the event.
pub async fn check_pdu(
    keys: &RemoteKeys,
    room_id: &RoomId,
    version: RoomVersion,
    raw: &Value,
    hashes: Hashes,
) -> Result<Pdu, InvalidPeek> {
    intake::check_raw(keys, room_id, version, raw.clone(), hashes)
        .await
        .map_err(|refused| bad(&refused.event_id, refused.reason.to_string()))
}

/// Validates a full peek answer for `room_id` (OP-4, steps 1-6).
pub async fn validate(keys: &RemoteKeys, room_id: &RoomId, body: &Value) -> Result<ValidPeek, InvalidPeek> {
    // 1. A missing version means "1", which we do not support.
    let raw_version = body.get("room_version").and_then(Value::as_str).unwrap_or("1");
    let version =
        RoomVersion::parse(raw_version).ok_or_else(|| InvalidPeek::UnsupportedVersion(raw_version.to_owned()))?;
    let ValidState { state, state_events, all, accepted } = validate_state(keys, room_id, version, body).await?;
    check_peekable(&state, &all)?;
    // 6. Recent history (`messages`, some targets' shape) and the latest event, in whichever
    // shape the target sent it.
    let messages = messages(keys, room_id, version, body, &accepted).await?;
    let latest = latest_event(keys, room_id, version, body, &accepted, &messages, &state_events).await?;
    let mut timeline: Vec<Pdu> =
        messages.into_iter().filter(|p| p.depth <= latest.depth && p.event_id != latest.event_id).collect();
    timeline.sort_by_key(|p| p.depth);
    let renewal_interval_ms = body.get("renewal_interval").and_then(Value::as_i64).unwrap_or(3_600_000).max(1);
    Ok(ValidPeek { version, state, events: all.into_values().collect(), latest, timeline, renewal_interval_ms })
}

/// A room's state and auth chain as another server answered them (a peek or `send_join`
/// answer), every check passed.
pub struct ValidState {
    pub state: StateMap,
    /// The events of `state`, as listed.
    pub state_events: Vec<Pdu>,
    /// Every event of the state and the auth chain, by ID.
    pub all: BTreeMap<String, Pdu>,
    /// The same events once authorised against their own auth events.
    pub accepted: HashMap<String, Pdu>,
}

/// OP-4 steps 2-5 on `state` and `auth_chain`, shared by peek and `send_join` answers (JN-6):
/// every PDU on its own, exactly one create event (from the room ID's server where the ID has
/// one), the auth rules for each event against its auth events, one event per state key.
pub async fn validate_state(
    keys: &RemoteKeys,
    room_id: &RoomId,
    version: RoomVersion,
    body: &Value,
) -> Result<ValidState, InvalidPeek> {
    let list = |name: &str| -> Result<Vec<Value>, InvalidPeek> {
        match body.get(name) {
            Some(Value::Array(items)) => Ok(items.clone()),
            None if name == "auth_chain" => Ok(Vec::new()),
            _ => Err(InvalidPeek::Malformed(format!("`{name}` is not a list"))),
        }
    };
    // 2. Every PDU on its own.
    let mut state_events = Vec::new();
    for raw in list("state")? {
        state_events.push(check_pdu(keys, room_id, version, &raw, Hashes::Strict).await?);
    }
    let mut all: BTreeMap<String, Pdu> = state_events.iter().map(|p| (p.event_id.to_string(), p.clone())).collect();
    for raw in list("auth_chain")? {
        let pdu = check_pdu(keys, room_id, version, &raw, Hashes::Strict).await?;
        all.entry(pdu.event_id.to_string()).or_insert(pdu);
    }
    // 3. Exactly one create event, from the room ID's server.
    let creates: Vec<&Pdu> = all.values().filter(|p| p.event_type() == "m.room.create").collect();
    let [create] = creates.as_slice() else {
        return Err(InvalidPeek::Malformed(format!("{} create events instead of one", creates.len())));
    };
    if room_id.server_name().is_some_and(|server| create.sender.server_name() != server) {
        return Err(bad(create.event_id.as_str(), "the create event's sender is not from the room ID's server"));
    }
    // 4. The auth rules, each event against its own auth events: CPU work over up to thousands
    // of events, on a blocking thread rather than an async worker (H16).
    let (all, accepted) =
        tokio::task::spawn_blocking(move || authorise_all(version, &all).map(|accepted| (all, accepted)))
            .await
            .map_err(|e| InvalidPeek::Malformed(format!("the authorisation task failed: {e}")))??;
    // 5. One event per state key, the create event among them.
    let mut state = StateMap::new();
    for pdu in &state_events {
        let key = (pdu.event_type(), pdu.state_key.clone().unwrap_or_default());
        if pdu.state_key.is_none() {
            return Err(bad(pdu.event_id.as_str(), "a non-state event in `state`"));
        }
        if state.insert(key, pdu.event_id.to_string()).is_some() {
            return Err(bad(pdu.event_id.as_str(), "two state events for the same type and state key"));
        }
    }
    if !state.contains_key(&("m.room.create".to_owned(), String::new())) {
        return Err(InvalidPeek::Malformed("the state has no create event".into()));
    }
    Ok(ValidState { state, state_events, all, accepted })
}

/// JN-6: our join, checked against a `send_join` answer's validated state (see
/// [`check_event_against`]). Returns the state after the join.
pub fn check_join_against(version: RoomVersion, join: &Pdu, valid: &ValidState) -> Result<StateMap, InvalidPeek> {
    check_event_against(version, join, valid)
}

/// An event checked against a validated state before it (a `send_join` answer, JN-6; a state
/// fetched for a gap, JN-8): its auth events are among the validated events, and it passes the
/// auth rules against them and against that state. Returns the state after it.
pub fn check_event_against(version: RoomVersion, join: &Pdu, valid: &ValidState) -> Result<StateMap, InvalidPeek> {
    let id = join.event_id.to_string();
    if let Some(missing) = join.auth_events.iter().find(|a| !valid.accepted.contains_key(a.as_str())) {
        return Err(bad(&id, format!("auth event {missing} is not in the answer")));
    }
    check_against_auth_events(version, join, &valid.accepted)?;
    let fetch_event = |event_id: &EventId| valid.accepted.get(event_id.as_str()).cloned();
    let fetch_state = |kind: &StateEventType, state_key: &str| {
        valid.state.get(&(kind.to_string(), state_key.to_owned())).and_then(|e| valid.accepted.get(e)).cloned()
    };
    events::check_auth(version, join, fetch_event, fetch_state)
        .map_err(|e| bad(&id, format!("against the state before it: {e}")))?;
    let mut after = valid.state.clone();
    if let Some(state_key) = &join.state_key {
        after.insert((join.event_type(), state_key.clone()), id);
    }
    Ok(after)
}

/// OP-4.6: the `messages` list some targets send instead of `latest_event` (recent events,
/// oldest first). Only the [`MAX_MESSAGES`] deepest are looked at; each must pass the checks
/// of `latest_event` (room, signatures, hash, auth against auth events that are in the answer
/// or among the earlier messages), or the whole answer is refused. Returned in depth order,
/// without duplicates.
async fn messages(
    keys: &RemoteKeys,
    room_id: &RoomId,
    version: RoomVersion,
    body: &Value,
    accepted: &HashMap<String, Pdu>,
) -> Result<Vec<Pdu>, InvalidPeek> {
    let mut raw = match body.get("messages") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items.iter().collect::<Vec<_>>(),
        Some(_) => return Err(InvalidPeek::Malformed("`messages` is not a list".into())),
    };
    // Deepest last; the claimed depth only chooses what is looked at, the checks come after.
    raw.sort_by_key(|v| v.get("depth").and_then(Value::as_i64).unwrap_or(i64::MIN));
    let skip = raw.len().saturating_sub(MAX_MESSAGES);
    let mut checked = Vec::with_capacity(raw.len() - skip);
    for raw in &raw[skip..] {
        checked.push(check_pdu(keys, room_id, version, raw, Hashes::Strict).await?);
    }
    checked.sort_by_key(|p| p.depth);
    let mut known = accepted.clone();
    let mut out: Vec<Pdu> = Vec::with_capacity(checked.len());
    for pdu in checked {
        let id = pdu.event_id.to_string();
        if out.iter().any(|p| p.event_id == pdu.event_id) {
            continue;
        }
        if let Some(same) = accepted.get(&id) {
            out.push(same.clone());
            continue;
        }
        if let Some(missing) = pdu.auth_events.iter().find(|a| !known.contains_key(a.as_str())) {
            return Err(bad(&id, format!("auth event {missing} is not in the answer")));
        }
        check_against_auth_events(version, &pdu, &known)?;
        known.insert(id, pdu.clone());
        out.push(pdu);
    }
    Ok(out)
}

/// Checks events in dependency order, each once all its auth events passed. Any failure makes
/// the whole answer invalid: the state and its auth chain are the room's starting point, and a
/// starting point with a rejected event in it cannot be trusted.
fn authorise_all(version: RoomVersion, all: &BTreeMap<String, Pdu>) -> Result<HashMap<String, Pdu>, InvalidPeek> {
    let ids: Vec<&str> = all.keys().map(String::as_str).collect();
    let mut edges = Vec::with_capacity(ids.len());
    for pdu in all.values() {
        let mut auth: Vec<&str> = pdu.auth_events.iter().map(|id| id.as_str()).collect();
        if let Some(missing) = auth.iter().find(|id| !all.contains_key(**id)) {
            return Err(bad(pdu.event_id.as_str(), format!("auth event {missing} is not in the answer")));
        }
        // v12: every event also needs the create event its room ID names (in no auth events).
        if version.room_id_is_create_hash() && pdu.event_type() != "m.room.create" {
            if let Some((id, _)) = all.get_key_value(&events::create_event_id_of(&pdu.room_id)) {
                auth.push(id.as_str());
            }
        }
        auth.sort_unstable();
        auth.dedup();
        edges.push(auth.into_iter().map(|id| ids.binary_search(&id).expect("checked above")).collect());
    }
    let order = dependency_order(&edges).map_err(|stuck| bad(ids[stuck], "auth events form a cycle"))?;
    tracing::debug!(events = ids.len(), steps = order.steps, "peek answer: auth order found");
    let mut accepted: HashMap<String, Pdu> = HashMap::with_capacity(ids.len());
    for index in order.order {
        let pdu = &all[ids[index]];
        check_against_auth_events(version, pdu, &accepted)?;
        accepted.insert(pdu.event_id.to_string(), pdu.clone());
    }
    Ok(accepted)
}

/// A dependency order of nodes `0..needs.len()`, where `needs[i]` lists the nodes `i` depends
/// on (distinct): every node after all it needs.
struct DependencyOrder {
    order: Vec<usize>,
    /// Nodes taken plus dependencies resolved: at most nodes + edges (H16).
    steps: usize,
}

/// Kahn's algorithm: linear in nodes plus edges, whatever order the nodes come in (H16: the
/// earlier repeated passes were quadratic for an answer listing each event before its auth
/// events). `Err(node)` names a node on or behind a cycle.
fn dependency_order(needs: &[Vec<usize>]) -> Result<DependencyOrder, usize> {
    let mut unmet: Vec<usize> = needs.iter().map(Vec::len).collect();
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); needs.len()];
    for (node, deps) in needs.iter().enumerate() {
        for &dep in deps {
            dependents[dep].push(node);
        }
    }
    let mut ready: Vec<usize> = (0..needs.len()).filter(|&node| unmet[node] == 0).collect();
    let mut order = Vec::with_capacity(needs.len());
    let mut steps = 0;
    while let Some(node) = ready.pop() {
        steps += 1;
        order.push(node);
        for &waiting in &dependents[node] {
            steps += 1;
            unmet[waiting] -= 1;
            if unmet[waiting] == 0 {
                ready.push(waiting);
            }
        }
    }
    match (0..needs.len()).find(|&node| unmet[node] > 0) {
        Some(stuck) => Err(stuck),
        None => Ok(DependencyOrder { order, steps }),
    }
}

fn check_against_auth_events(
    version: RoomVersion,
    pdu: &Pdu,
    accepted: &HashMap<String, Pdu>,
) -> Result<(), InvalidPeek> {
    let mut by_key: HashMap<(String, String), &Pdu> = pdu
        .auth_events
        .iter()
        .filter_map(|id| accepted.get(id.as_str()))
        .map(|p| ((p.event_type(), p.state_key.clone().unwrap_or_default()), p))
        .collect();
    // v12: the create event is in no auth events; the room ID names it.
    if version.room_id_is_create_hash() && pdu.event_type() != "m.room.create" {
        if let Some(create) = accepted.get(&events::create_event_id_of(&pdu.room_id)) {
            by_key.insert(("m.room.create".to_owned(), String::new()), create);
        }
    }
    let fetch_event = |id: &EventId| accepted.get(id.as_str()).cloned();
    let fetch_state = |kind: &StateEventType, state_key: &str| {
        by_key.get(&(kind.to_string(), state_key.to_owned())).map(|p| (*p).clone())
    };
    events::check_auth(version, pdu, fetch_event, fetch_state).map_err(|e| bad(pdu.event_id.as_str(), e.to_string()))
}

/// OP-4.5: the one peekability rule ([`visibility::peekable`]) over the answer's state; a room
/// that fails it is treated as a 403.
fn check_peekable(state: &StateMap, all: &BTreeMap<String, Pdu>) -> Result<(), InvalidPeek> {
    let content =
        |kind: &str| state.get(&(kind.to_owned(), String::new())).and_then(|id| all.get(id)).map(|p| p.content_value());
    visibility::peekable(content).map_err(InvalidPeek::NotPeekable)
}

/// The answer's forward extremity: `latest_event`, else `latest_event_id` naming a state event
/// or one of `messages`, else the newest of `messages` by depth, else the newest state event
/// (OP-4.6). A `latest_event` must pass the same checks; its
/// `prev_events` may be unknown (they are fetched later, never fatal).
async fn latest_event(
    keys: &RemoteKeys,
    room_id: &RoomId,
    version: RoomVersion,
    body: &Value,
    accepted: &HashMap<String, Pdu>,
    messages: &[Pdu],
    state_events: &[Pdu],
) -> Result<Pdu, InvalidPeek> {
    if let Some(raw) = body.get("latest_event").filter(|v| v.is_object()) {
        let pdu = check_pdu(keys, room_id, version, raw, Hashes::Strict).await?;
        if let Some(known) = accepted.get(pdu.event_id.as_str()) {
            return Ok(known.clone());
        }
        if let Some(missing) = pdu.auth_events.iter().find(|id| !accepted.contains_key(id.as_str())) {
            return Err(bad(pdu.event_id.as_str(), format!("auth event {missing} is not in the answer")));
        }
        check_against_auth_events(version, &pdu, accepted)?;
        return Ok(pdu);
    }
    if let Some(id) = body.get("latest_event_id").and_then(Value::as_str) {
        if let Some(pdu) = accepted.get(id).or_else(|| messages.iter().find(|p| p.event_id.as_str() == id)) {
            return Ok(pdu.clone());
        }
    }
    if let Some(newest) = messages.iter().max_by_key(|p| p.depth) {
        return Ok(newest.clone());
    }
    state_events
        .iter()
        .max_by_key(|p| p.depth)
        .cloned()
        .ok_or_else(|| InvalidPeek::Malformed("no latest event and no state".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// H16: a chain of 20,000 events listed newest first (each before its auth event) is put in
    /// order in at most nodes + edges steps; the repeated passes it replaces took one pass per
    /// event, about 200 million checks here.
    #[test]
    fn a_hostile_order_costs_linear_work() {
        let n = 20_000;
        // Node i needs node i + 1: listed from the newest to the oldest.
        let needs: Vec<Vec<usize>> = (0..n).map(|i| if i + 1 < n { vec![i + 1] } else { Vec::new() }).collect();
        let order = dependency_order(&needs).unwrap();
        assert_eq!(order.order, (0..n).rev().collect::<Vec<_>>());
        assert!(order.steps <= n + (n - 1), "{} steps", order.steps);
    }

    #[test]
    fn every_node_comes_after_what_it_needs_and_cycles_are_refused() {
        let needs = vec![vec![2, 3], vec![0], vec![], vec![2]];
        let order = dependency_order(&needs).unwrap().order;
        let at = |node: usize| order.iter().position(|&n| n == node).unwrap();
        for (node, deps) in needs.iter().enumerate() {
            assert!(deps.iter().all(|&dep| at(dep) < at(node)), "{order:?}");
        }
        // 0 -> 1 -> 0, and 2 behind the cycle; 3 is fine.
        assert!(dependency_order(&[vec![1], vec![0], vec![0], vec![]]).is_err());
        // An event that is its own auth event.
        assert_eq!(dependency_order(&[vec![0]]).err(), Some(0));
    }
}
