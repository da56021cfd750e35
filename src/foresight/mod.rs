//! Foresight: each target's weekly rhythm and what follows from it. The
//! activity profile kept in one annotation on the target (`profile`), the
//! predicted first use of a day and the pre-wake ahead of it (`predict`),
//! and what-if runs of policies over a period through the agent's own
//! decision core (`simulate`), for targets as they stand (`what_if`). Pure: no client, no clock, no I/O; the agent
//! flushes profiles, asks for pre-wakes and serves simulations.

pub mod predict;
pub mod profile;
pub mod simulate;
pub mod what_if;
