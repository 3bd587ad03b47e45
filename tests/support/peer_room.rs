//! A room hosted by test peers (no gateway involved), so that two peers can serve the same room
//! as peek targets: failover tests need a second target that holds the room's history.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Value};

use super::peer::TestPeer;

/// The room's events in order, and its state. Events are room version 10 and signed by their
/// sender's peer.
#[derive(Default)]
pub struct PeerRoom {
    pub room_id: String,
    /// `(event_id, pdu)` oldest first.
    pub events: Vec<(String, Value)>,
    state: BTreeMap<(String, String), String>,
}

const VERSION: &str = "10";

impl PeerRoom {
    /// A world-readable public room created by `@{localpart}:{host}`.
    pub fn create(host: &TestPeer, localpart: &str) -> PeerRoom {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let mut room = PeerRoom { room_id: format!("!{}:{}", &suffix[..12], host.name), ..PeerRoom::default() };
        let creator = format!("@{localpart}:{}", host.name);
        room.add(host, localpart, "m.room.create", Some(""), json!({ "creator": creator, "room_version": VERSION }));
        room.add(host, localpart, "m.room.member", Some(&creator), json!({ "membership": "join" }));
        room.add(host, localpart, "m.room.power_levels", Some(""), json!({ "users": { creator.clone(): 100 } }));
        room.add(host, localpart, "m.room.join_rules", Some(""), json!({ "join_rule": "public" }));
        room.add(
            host,
            localpart,
            "m.room.history_visibility",
            Some(""),
            json!({ "history_visibility": "world_readable" }),
        );
        room
    }

    /// `@{localpart}:{peer}` joins.
    pub fn join(&mut self, peer: &TestPeer, localpart: &str) {
        let user = format!("@{localpart}:{}", peer.name);
        self.add(peer, localpart, "m.room.member", Some(&user), json!({ "membership": "join" }));
    }

    /// A message from `@{localpart}:{peer}`; returns the PDU.
    pub fn say(&mut self, peer: &TestPeer, localpart: &str, body: &str) -> Value {
        self.add(peer, localpart, "m.room.message", None, json!({ "msgtype": "m.text", "body": body }))
    }

    fn state_id(&self, kind: &str, key: &str) -> Option<String> {
        self.state.get(&(kind.to_owned(), key.to_owned())).cloned()
    }

    /// The auth events the spec requires for this event.
    fn auth_events(&self, kind: &str, sender: &str, state_key: Option<&str>) -> Vec<String> {
        if kind == "m.room.create" {
            return Vec::new();
        }
        let mut ids = vec![self.state_id("m.room.create", "")];
        ids.push(self.state_id("m.room.power_levels", ""));
        ids.push(self.state_id("m.room.member", sender));
        if kind == "m.room.member" {
            ids.push(self.state_id("m.room.join_rules", ""));
            if let Some(target) = state_key {
                ids.push(self.state_id("m.room.member", target));
            }
        }
        let ids: BTreeSet<String> = ids.into_iter().flatten().collect();
        ids.into_iter().collect()
    }

    fn add(&mut self, peer: &TestPeer, localpart: &str, kind: &str, state_key: Option<&str>, content: Value) -> Value {
        let sender = format!("@{localpart}:{}", peer.name);
        let auth = self.auth_events(kind, &sender, state_key);
        let prev: Vec<String> = self.events.last().map(|(id, _)| id.clone()).into_iter().collect();
        let depth = self.events.len() as i64 + 1;
        let (pdu, id) =
            peer.build_pdu(VERSION, &self.room_id, localpart, kind, state_key, content, &auth, &prev, depth);
        if let Some(key) = state_key {
            self.state.insert((kind.to_owned(), key.to_owned()), id.clone());
        }
        self.events.push((id, pdu.clone()));
        pdu
    }

    /// A non-state event from `@{localpart}:{peer}` on top of `prev` (not necessarily the newest
    /// event: a fork), with extra top-level fields; recorded in the room. Returns the PDU and
    /// its ID.
    pub fn fork(
        &mut self,
        peer: &TestPeer,
        localpart: &str,
        (kind, content): (&str, Value),
        prev: &[String],
        extra: &[(&str, Value)],
    ) -> (Value, String) {
        let sender = format!("@{localpart}:{}", peer.name);
        let auth = self.auth_events(kind, &sender, None);
        let depth = self.events.len() as i64 + 1;
        let (pdu, id) =
            peer.build_pdu_with(VERSION, &self.room_id, localpart, (kind, None, content), &auth, prev, depth, extra);
        self.events.push((id.clone(), pdu.clone()));
        (pdu, id)
    }

    fn by_id(&self, id: &str) -> Option<&Value> {
        self.events.iter().find(|(e, _)| e == id).map(|(_, pdu)| pdu)
    }

    /// A full MSC2444 answer: current state, its auth chain, the newest event.
    pub fn peek_answer(&self, renewal_interval_ms: u64) -> Value {
        let state: Vec<Value> = self.state.values().filter_map(|id| self.by_id(id).cloned()).collect();
        let mut chain: BTreeSet<String> = BTreeSet::new();
        let mut frontier: Vec<String> = state
            .iter()
            .flat_map(|e| e["auth_events"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()))
            .collect();
        while let Some(id) = frontier.pop() {
            if chain.insert(id.clone()) {
                let event = self.by_id(&id).expect("auth events are in the room");
                frontier
                    .extend(event["auth_events"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()));
            }
        }
        let auth_chain: Vec<Value> = chain.iter().filter_map(|id| self.by_id(id).cloned()).collect();
        let (latest_id, latest) = self.events.last().expect("the room has events");
        json!({
            "room_version": VERSION,
            "state": state,
            "auth_chain": auth_chain,
            "latest_event": latest,
            "latest_event_id": latest_id,
            "renewal_interval": renewal_interval_ms,
        })
    }

    /// The answer of a target in another dialect (OP-4.6): state and auth chain as usual, no
    /// `latest_event` nor `latest_event_id`, and the newest `count` events in `messages`,
    /// oldest first.
    pub fn dialect_peek_answer(&self, renewal_interval_ms: u64, count: usize) -> Value {
        let mut answer = self.peek_answer(renewal_interval_ms);
        let object = answer.as_object_mut().unwrap();
        object.remove("latest_event");
        object.remove("latest_event_id");
        let skip = self.events.len().saturating_sub(count);
        let messages: Vec<Value> = self.events[skip..].iter().map(|(_, pdu)| pdu.clone()).collect();
        object.insert("messages".into(), Value::Array(messages));
        answer
    }

    /// `/backfill`: the events `from` the newest of `from` back, newest first, at most `limit`;
    /// `None` when none of `from` is known.
    pub fn backfill(&self, from: &[String], limit: usize) -> Option<Vec<Value>> {
        let newest = self.events.iter().rposition(|(id, _)| from.contains(id))?;
        let start = (newest + 1).saturating_sub(limit);
        Some(self.events[start..=newest].iter().rev().map(|(_, pdu)| pdu.clone()).collect())
    }

    /// `get_missing_events`: the events after the newest of `earliest` up to (not including)
    /// `latest`, oldest first, at most `limit` (the newest ones when there are more).
    pub fn missing(&self, earliest: &[String], latest: &[String], limit: usize) -> Vec<Value> {
        let start = self.events.iter().rposition(|(id, _)| earliest.contains(id)).map_or(0, |i| i + 1);
        let end = self.events.iter().position(|(id, _)| latest.contains(id)).unwrap_or(self.events.len());
        let slice = &self.events[start.min(end)..end];
        let skip = slice.len().saturating_sub(limit);
        slice[skip..].iter().map(|(_, pdu)| pdu.clone()).collect()
    }
}
