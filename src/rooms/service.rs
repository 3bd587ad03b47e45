//! The room service shared by the client and federation APIs, the sender and `/sync`.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use rand::distr::{Alphanumeric, SampleString};
use ruma::{OwnedRoomId, OwnedServerName, RoomId, ServerName, UserId};
use serde_json::Value;
use tokio::sync::watch;

use super::create::CreateRoomRequest;
use super::error::RoomError;
use super::group_commit::{GroupCommit, LocalAppend};
use super::store::{Appended, StateMap, StoredEvent};
use super::visibility::Visibility;
use super::{create, hooks, store, visibility};

use crate::clock::now_ms;
use crate::db::schema::room_aliases;
use crate::db::write_transaction;
use crate::db::{Db, DbConnection};
use crate::events::{EventDraft, Pdu};
use crate::keys::SigningKey;
use diesel::prelude::*;

/// The room service shared by the client and federation APIs.
pub struct Rooms {
    pub(super) db: Db,
    pub(super) key: Arc<SigningKey>,
    pub(super) server_name: OwnedServerName,
    hooks: hooks::AppendHooks,
    /// Local appends, committed in groups.
    appends: Arc<GroupCommit>,
    /// The newest stream position; the sender and `/sync` wait on changes.
    stream: watch::Sender<i64>,
    /// The newest position appended by this instance (other instances are told of it).
    local: watch::Sender<i64>,
    visibility: Arc<visibility::VisibilityCache>,
    /// Servers with joined members per room, valid while the room's current state group is the
    /// one recorded (every membership change makes a new group, on any instance).
    joined: Arc<JoinedCache>,
    /// Recently read events. Stored events never change, so a hit is always current.
    events: Arc<EventCache>,
}

impl Rooms {
    /// `state_event_hooks` run inside the append transaction after every state event.
    pub fn new(
        db: Db,
        key: Arc<SigningKey>,
        server_name: OwnedServerName,
        state_event_hooks: Vec<hooks::StateEventHook>,
    ) -> Rooms {
        let hooks = hooks::AppendHooks::new(server_name.as_str(), state_event_hooks);
        Rooms {
            appends: Arc::new(GroupCommit::new(db.clone(), key.clone(), hooks.clone())),
            db,
            key,
            hooks,
            server_name,
            stream: watch::Sender::new(0),
            local: watch::Sender::new(0),
            visibility: Arc::default(),
            joined: Arc::default(),
            events: Arc::default(),
        }
    }

    pub fn server_name(&self) -> &ServerName {
        &self.server_name
    }

    /// Subscribe to "new events were appended" (the value is the newest stream position).
    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.stream.subscribe()
    }

    /// Subscribe to "this instance appended events" (for telling other instances).
    pub fn subscribe_local(&self) -> watch::Receiver<i64> {
        self.local.subscribe()
    }

    /// Another instance stored events up to `stream_pos` (a PostgreSQL notification).
    pub fn note_appended(&self, stream_pos: i64) {
        advance(&self.stream, stream_pos);
    }

    pub(super) fn appended(&self, stream_pos: i64) {
        advance(&self.stream, stream_pos);
        advance(&self.local, stream_pos);
    }

    /// Creates a room of ours with the events of `request`, all or nothing.
    pub async fn create_room(&self, creator: &UserId, request: CreateRoomRequest) -> Result<OwnedRoomId, RoomError> {
        let room_id =
            RoomId::parse(format!("!{}:{}", Alphanumeric.sample_string(&mut rand::rng(), 18), self.server_name))
                .map_err(|e| RoomError::Internal(e.to_string()))?;
        let plan = create::plan(&self.server_name, creator, &room_id, request)?;
        // v12: the room ID is the create event's reference hash.
        let (room_id, create) = if plan.version().room_id_is_create_hash() {
            let create = create::build_create(&self.key, &self.server_name, creator, &room_id, &plan)?;
            (create.room_id.clone(), Some(create))
        } else {
            (room_id, None)
        };
        let (key, hooks) = (self.key.clone(), self.hooks.clone());
        let creator = creator.to_owned();
        let rid = room_id.clone();
        let last = self
            .db
            .run(move |conn| {
                write_transaction::<_, RoomError, _>(conn, |conn| {
                    create::execute(conn, &key, &hooks, &rid, &creator, plan, create)
                })
            })
            .await?;
        self.appended(last);
        Ok(room_id)
    }

    /// Appends one event from a local user (the single append path for local events).
    pub async fn send(
        &self,
        room_id: &RoomId,
        sender: &UserId,
        kind: &str,
        state_key: Option<&str>,
        content: Value,
    ) -> Result<Appended, RoomError> {
        self.send_once(room_id, sender, kind, state_key, content, None).await
    }

    /// Like [`Rooms::send`], but a repeated client transaction `(device_id, txn_id)` returns the
    /// event it created the first time instead of appending again (checked under the append lock).
    pub async fn send_once(
        &self,
        room_id: &RoomId,
        sender: &UserId,
        kind: &str,
        state_key: Option<&str>,
        content: Value,
        txn: Option<(String, String)>,
    ) -> Result<Appended, RoomError> {
        let draft = EventDraft::new(room_id, sender, kind, state_key, content);
        let appended = self.appends.append(LocalAppend { room_id: room_id.to_string(), draft, txn }).await?;
        self.appended(appended.stream_pos);
        Ok(appended)
    }

    /// Stores an event another server sent (signatures already verified): the append path for
    /// remote events. `None` when we already had it.
    pub async fn append_remote(&self, room_id: &RoomId, pdu: Pdu) -> Result<Option<Appended>, RoomError> {
        let (room, hooks) = (room_id.to_string(), self.hooks.clone());
        let appended = self
            .db
            .run(move |conn| {
                write_transaction::<_, RoomError, _>(conn, |conn| {
                    let row = store::lock_for_append(conn, &room)?;
                    store::append_remote(conn, &hooks, &row, &pdu)
                })
            })
            .await?;
        if let Some(appended) = &appended {
            self.appended(appended.stream_pos);
        }
        Ok(appended)
    }

    /// Stores a validated peek answer as the starting point of a room of another server (see
    /// [`store::store_snapshot`]), all or nothing.
    pub async fn store_snapshot(
        &self,
        room_id: &RoomId,
        version: crate::events::RoomVersion,
        state: StateMap,
        outliers: Vec<Pdu>,
        latest: Pdu,
        timeline: Vec<Pdu>,
    ) -> Result<i64, RoomError> {
        let no_more = |_: &mut DbConnection, _: &Pdu, _: i64| Ok(());
        self.store_snapshot_then(room_id, version, state, outliers, latest, timeline, no_more).await
    }

    /// [`Rooms::store_snapshot`], then `then(conn, latest, its position)` in the same
    /// transaction (a join records who else is in the room, JN-6/JN-10).
    #[allow(clippy::too_many_arguments)]
    pub async fn store_snapshot_then(
        &self,
        room_id: &RoomId,
        version: crate::events::RoomVersion,
        state: StateMap,
        outliers: Vec<Pdu>,
        latest: Pdu,
        timeline: Vec<Pdu>,
        then: impl FnOnce(&mut DbConnection, &Pdu, i64) -> Result<(), RoomError> + Send + 'static,
    ) -> Result<i64, RoomError> {
        let room = room_id.to_string();
        self.write_and_publish(move |conn| {
            let snapshot = store::Snapshot { state: &state, outliers: &outliers, latest: &latest, timeline: &timeline };
            let pos = store::store_snapshot(conn, &room, version, now_ms(), snapshot)?;
            then(conn, &latest, pos)?;
            Ok(pos)
        })
        .await
    }

    /// Runs `work` (which stores events out of the usual append order, returning a position) in
    /// one write transaction, then tells `/sync` and the sender about the newest position.
    pub(super) async fn write_and_publish(
        &self,
        work: impl FnOnce(&mut DbConnection) -> Result<i64, RoomError> + Send + 'static,
    ) -> Result<i64, RoomError> {
        let (pos, newest) = self
            .db
            .run(move |conn| {
                write_transaction::<_, RoomError, _>(conn, |conn| {
                    let pos = work(conn)?;
                    Ok((pos, store::max_stream_pos(conn)?))
                })
            })
            .await?;
        self.appended(newest);
        Ok(pos)
    }

    /// The newest stream position over all rooms.
    pub async fn max_stream_pos(&self) -> Result<i64, RoomError> {
        self.read(store::max_stream_pos).await
    }

    pub async fn forward_extremities(&self, room_id: &RoomId) -> Result<Vec<String>, RoomError> {
        let room = room_id.to_string();
        self.read(move |conn| store::forward_extremities(conn, &room)).await
    }

    pub async fn room(&self, room_id: &RoomId) -> Result<Option<store::RoomRow>, RoomError> {
        let room = room_id.to_string();
        self.read(move |conn| store::room(conn, &room)).await
    }

    /// The current state event for `(kind, state_key)`.
    pub async fn state_event(&self, room_id: &RoomId, kind: &str, state_key: &str) -> Result<Option<Pdu>, RoomError> {
        let (room, kind, state_key) = (room_id.to_string(), kind.to_owned(), state_key.to_owned());
        self.read(move |conn| match store::current_state_id(conn, &room, &kind, &state_key)? {
            Some(id) => Ok(store::event_by_id(conn, &id)?.map(|e| e.pdu)),
            None => Ok(None),
        })
        .await
    }

    /// Every current state event of the room.
    pub async fn current_state(&self, room_id: &RoomId) -> Result<Vec<Pdu>, RoomError> {
        let room = room_id.to_string();
        self.read(move |conn| {
            let ids: Vec<String> = store::current_state_map(conn, &room)?.into_values().collect();
            Ok(store::events_by_ids(conn, &ids)?.into_iter().map(|e| e.pdu).collect())
        })
        .await
    }

    pub async fn event(&self, event_id: &str) -> Result<Option<StoredEvent>, RoomError> {
        let id = event_id.to_owned();
        self.read(move |conn| store::event_by_id(conn, &id)).await
    }

    /// The state after `event_id` (which must be in `room_id`), as full events.
    pub async fn state_after(&self, room_id: &RoomId, event_id: &str) -> Result<Vec<Pdu>, RoomError> {
        let (room, id) = (room_id.to_string(), event_id.to_owned());
        self.read(move |conn| {
            let stored = store::event_by_id(conn, &id)?.ok_or(RoomError::EventNotFound)?;
            if stored.pdu.room_id.as_str() != room {
                return Err(RoomError::EventNotFound);
            }
            let ids: Vec<String> = store::state_map_at_group(conn, stored.state_group)?.into_values().collect();
            Ok(store::events_by_ids(conn, &ids)?.into_iter().map(|e| e.pdu).collect())
        })
        .await
    }

    /// Events of `room_id` by ID (others and unknown IDs are left out).
    pub async fn events_by_ids(&self, room_id: &RoomId, ids: Vec<String>) -> Result<Vec<Pdu>, RoomError> {
        let room = room_id.to_owned();
        self.read(move |conn| {
            Ok(store::events_by_ids(conn, &ids)?.into_iter().map(|e| e.pdu).filter(|p| p.room_id == room).collect())
        })
        .await
    }

    /// Every event of a state group (see [`StoredEvent::state_group_before`]).
    pub async fn state_of_group(&self, group: i64) -> Result<Vec<Pdu>, RoomError> {
        self.read(move |conn| {
            let ids: Vec<String> = store::state_map_at_group(conn, group)?.into_values().collect();
            Ok(store::events_by_ids(conn, &ids)?.into_iter().map(|e| e.pdu).collect())
        })
        .await
    }

    /// The full auth chain of the given events, sorted by depth.
    pub async fn auth_chain(&self, event_ids: Vec<String>) -> Result<Vec<Pdu>, RoomError> {
        self.read(move |conn| store::auth_chain(conn, &event_ids)).await
    }

    /// A page of the room's timeline for `/messages`, from stream position `from` in either
    /// direction: the events in client format and the last position read. Non-members of a
    /// world-readable room see only its world-readable history.
    pub async fn timeline_page(
        &self,
        room_id: &RoomId,
        from: i64,
        forwards: bool,
        limit: i64,
        member: bool,
    ) -> Result<(Vec<Value>, Option<i64>), RoomError> {
        let events = self.events_in_range(room_id, from, forwards, limit).await?;
        let end = events.last().map(|e| e.stream_pos);
        let mut chunk = Vec::with_capacity(events.len());
        for event in &events {
            if member || self.visibility_of(event).await? == Visibility::WorldReadable {
                chunk.push(event.pdu.client_json());
            }
        }
        Ok((chunk, end))
    }

    /// Events by stream position (see [`store::events_in_range`]).
    pub async fn events_in_range(
        &self,
        room_id: &RoomId,
        from: i64,
        forwards: bool,
        limit: i64,
    ) -> Result<Vec<StoredEvent>, RoomError> {
        let room = room_id.to_string();
        self.read(move |conn| store::events_in_range(conn, &room, from, forwards, limit)).await
    }

    pub async fn latest_stream_pos(&self, room_id: &RoomId) -> Result<i64, RoomError> {
        let room = room_id.to_string();
        self.read(move |conn| store::latest_stream_pos(conn, &room)).await
    }

    /// Every room where `user_id` has a membership now: `(room, membership, stream position of
    /// that membership event)`.
    pub async fn memberships(&self, user_id: &UserId) -> Result<Vec<(String, String, i64)>, RoomError> {
        let user = user_id.to_string();
        self.read(move |conn| {
            use crate::db::schema::current_state;
            let ids: Vec<String> = current_state::table
                .filter(current_state::event_type.eq("m.room.member"))
                .filter(current_state::state_key.eq(&user))
                .select(current_state::event_id)
                .load(conn)?;
            Ok(store::events_by_ids(conn, &ids)?
                .into_iter()
                .map(|e| {
                    let membership = e.pdu.content_value()["membership"].as_str().unwrap_or_default().to_owned();
                    (e.pdu.room_id.to_string(), membership, e.stream_pos)
                })
                .collect())
        })
        .await
    }

    /// Whether the room can be peeked now (see [`visibility::peekability`]).
    pub async fn peekability(&self, room_id: &RoomId) -> Result<Result<(), &'static str>, RoomError> {
        let room = room_id.to_string();
        self.read(move |conn| visibility::peekability(conn, &room)).await
    }

    /// The room's history visibility now (see [`visibility::current`]).
    pub async fn current_visibility(&self, room_id: &RoomId) -> Result<Visibility, RoomError> {
        let room = room_id.to_string();
        self.read(move |conn| visibility::current(conn, &room)).await
    }

    /// The membership of `user_id` in the current state (`None` when never a member).
    pub async fn membership(&self, room_id: &RoomId, user_id: &UserId) -> Result<Option<String>, RoomError> {
        let event = self.state_event(room_id, "m.room.member", user_id.as_str()).await?;
        Ok(event.and_then(|pdu| pdu.content_value()["membership"].as_str().map(str::to_owned)))
    }

    /// The history visibility that applies to a stored event (WR-2).
    pub async fn visibility_of(&self, event: &StoredEvent) -> Result<Visibility, RoomError> {
        let event = event.clone();
        let cache = self.visibility.clone();
        self.read(move |conn| visibility::of_event(conn, &event, &cache)).await
    }

    /// Does `server` have a joined member in the current state (then membership rules apply)?
    pub async fn server_is_joined(&self, room_id: &RoomId, server: &ServerName) -> Result<bool, RoomError> {
        Ok(self.joined_servers(room_id).await?.contains(server.as_str()))
    }

    /// The servers with joined members in the room's current state.
    pub async fn joined_servers(&self, room_id: &RoomId) -> Result<Arc<BTreeSet<String>>, RoomError> {
        let room = room_id.to_string();
        let joined = self.joined.clone();
        self.read(move |conn| joined_servers(conn, &joined, &room)).await
    }

    /// An event and whether `server` may see it (JN-11, WR-2), in one database round trip at most
    /// (none for a cached event of world-readable history). Shared, not copied: events are read-only.
    /// `None` when the event is unknown.
    pub async fn event_for_server(
        &self,
        event_id: &str,
        server: &ServerName,
    ) -> Result<Option<(Arc<StoredEvent>, bool)>, RoomError> {
        // World-readable history needs no database round trip (nor a hop to the blocking pool):
        // an event's visibility to a server that is not in the room follows from the state before
        // it, which never changes, and a cached event is dropped when a redaction changes it.
        if let Some(event) = self.events.cached(event_id) {
            if visibility::of_event_cached(&event, &self.visibility) == Some(Visibility::WorldReadable) {
                return Ok(Some((event, true)));
            }
        }
        let (id, server) = (event_id.to_owned(), server.to_string());
        let (joined, cache, events) = (self.joined.clone(), self.visibility.clone(), self.events.clone());
        self.read(move |conn| {
            let Some(event) = events.get_or_load(conn, &id)? else {
                return Ok(None);
            };
            let joined_now = joined_servers(conn, &joined, event.pdu.room_id.as_str())?.contains(&server);
            let visible = visibility::server_may_see(conn, &event, &server, joined_now, &cache)?;
            Ok(Some((event, visible)))
        })
        .await
    }

    /// Whether `server` may see `event` (JN-11); `joined_now`: it has a member in the room now.
    pub async fn server_may_see(
        &self,
        event: &StoredEvent,
        server: &ServerName,
        joined_now: bool,
    ) -> Result<bool, RoomError> {
        let (event, server, cache) = (event.clone(), server.to_string(), self.visibility.clone());
        self.read(move |conn| visibility::server_may_see(conn, &event, &server, joined_now, &cache)).await
    }

    pub async fn resolve_alias(&self, alias: &str) -> Result<Option<OwnedRoomId>, RoomError> {
        let alias = alias.to_owned();
        self.read(move |conn| {
            let room: Option<String> = room_aliases::table
                .filter(room_aliases::alias.eq(&alias))
                .select(room_aliases::room_id)
                .first(conn)
                .optional()?;
            room.map(|r| RoomId::parse(r).map_err(|e| RoomError::Internal(e.to_string()))).transpose()
        })
        .await
    }

    pub(super) async fn read<T, F>(&self, work: F) -> Result<T, RoomError>
    where
        F: FnOnce(&mut DbConnection) -> Result<T, RoomError> + Send + 'static,
        T: Send + 'static,
    {
        self.db.run(work).await
    }
}

/// Moves a position watch forward (never back), waking its receivers.
fn advance(watch: &watch::Sender<i64>, stream_pos: i64) {
    watch.send_if_modified(|current| {
        let newer = stream_pos > *current;
        if newer {
            *current = stream_pos;
        }
        newer
    });
}

type JoinedCache = Mutex<HashMap<String, (Option<i64>, Arc<BTreeSet<String>>)>>;

/// The servers with joined members in the room's current state, cached per state group.
fn joined_servers(
    conn: &mut DbConnection,
    cache: &JoinedCache,
    room_id: &str,
) -> Result<Arc<BTreeSet<String>>, RoomError> {
    let group = store::room(conn, room_id)?.ok_or(RoomError::NotFound)?.current_state_group;
    if let Some((cached_group, servers)) = cache.lock().unwrap().get(room_id) {
        if *cached_group == group {
            return Ok(servers.clone());
        }
    }
    let servers = Arc::new(store::joined_servers_now(conn, room_id)?);
    cache.lock().unwrap().insert(room_id.to_owned(), (group, servers.clone()));
    Ok(servers)
}

/// A bounded map of recently read events (cleared when full). Stored events change only when
/// redacted (H19): entries read before the latest redaction this process knows of (applied
/// here or announced by another instance) are read again.
#[derive(Default)]
pub struct EventCache(Mutex<HashMap<String, (u64, Arc<StoredEvent>)>>);

const EVENT_CACHE_MAX: usize = 10_000;

impl EventCache {
    /// The event if it is cached and no redaction came since it was read.
    fn cached(&self, event_id: &str) -> Option<Arc<StoredEvent>> {
        let epoch = store::redactions::epoch();
        let map = self.0.lock().unwrap();
        let (read_at, event) = map.get(event_id)?;
        (*read_at == epoch).then(|| event.clone())
    }

    fn get_or_load(&self, conn: &mut DbConnection, event_id: &str) -> Result<Option<Arc<StoredEvent>>, RoomError> {
        let epoch = store::redactions::epoch();
        if let Some(event) = self.cached(event_id) {
            return Ok(Some(event));
        }
        let Some(event) = store::event_by_id(conn, event_id)? else {
            return Ok(None);
        };
        let event = Arc::new(event);
        let mut map = self.0.lock().unwrap();
        if map.len() >= EVENT_CACHE_MAX {
            map.clear();
        }
        map.insert(event_id.to_owned(), (epoch, event.clone()));
        Ok(Some(event))
    }
}
