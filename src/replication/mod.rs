//! Replication between regions. A write commits its outbox row with the record in one transaction;
//! what the outbox holds is an [`event::Event`], the versioned unit that other regions merge.

pub mod event;
