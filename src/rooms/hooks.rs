//! What the append path publishes. Modules that must act on a new event inside its append
//! transaction (peeks that end when a room stops being peekable, device peeks that end on a
//! join) register a hook at start-up; the append path calls them without knowing who they are.
//! Everything that may wait for the commit (the sender, `/sync`) listens to the stream position
//! instead ([`super::service::Rooms::subscribe`]).

use std::sync::Arc;

use crate::db::DbConnection;
use crate::events::Pdu;

use super::error::RoomError;

/// Called after a state event is stored, in the same transaction: our server name, the event,
/// and its stream position. An error rolls the append back.
pub type StateEventHook = fn(&mut DbConnection, &str, &Pdu, i64) -> Result<(), RoomError>;

/// The hooks and the server name they are told; cheap to clone into blocking tasks.
#[derive(Clone)]
pub struct AppendHooks {
    server_name: Arc<str>,
    state_event: Arc<[StateEventHook]>,
}

impl AppendHooks {
    pub fn new(server_name: &str, state_event: Vec<StateEventHook>) -> AppendHooks {
        AppendHooks { server_name: server_name.into(), state_event: state_event.into() }
    }

    pub fn server_name(&self) -> &str {
        &self.server_name
    }

    pub(super) fn after_state_event(&self, conn: &mut DbConnection, pdu: &Pdu, position: i64) -> Result<(), RoomError> {
        self.state_event.iter().try_for_each(|hook| hook(conn, &self.server_name, pdu, position))
    }
}
