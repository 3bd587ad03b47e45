//! Membership over federation (`spec/membership.md`): other servers' users joining and leaving
//! our rooms ([`inbound`]: `make_join`/`send_join`, `make_leave`/`send_leave`; JN-1, JN-2,
//! JN-4), our users joining rooms of other servers ([`outbound`], JN-6), and which servers
//! receive our events because they have a joined member ([`spans`], JN-10).

pub mod catch_up;
pub mod inbound;
pub mod invites;
pub mod outbound;
pub mod spans;

pub use inbound::{Membership, MembershipError};
