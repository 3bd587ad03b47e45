//! Rooms: the one append path for events, state at any event, auth chains, aliases and the
//! history visibility that applies to an event. The [`Rooms`] service (in `service`) wraps
//! the synchronous storage functions of [`store`] in `Db::run`.

mod create;
mod error;
mod group_commit;
pub mod hooks;
mod membership_events;
mod service;
pub mod store;
pub mod visibility;

pub use create::{CreateRoomRequest, InitialStateEvent};
pub use error::RoomError;
pub use service::{EventCache, Rooms};
pub use store::{Appended, StateMap, StoredEvent};
pub use visibility::Visibility;
