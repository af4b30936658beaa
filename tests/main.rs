#![recursion_limit = "256"]
//! The integration tests: one binary, real PostgreSQL and nats-server
//! processes started by `harness`, the real walnats binary.

mod harness;
mod support;

mod catalogue;
mod cli;
mod cluster;
mod exactly_once;
mod examples;
mod failover;
mod failover_config;
mod hostile_owner;
mod house;
mod http;
mod limits;
mod memory;
mod nats_auth;
mod outbox;
mod pg_connection;
mod publishing;
mod resume;
mod secrets;
mod security;
mod snapshot;
mod standby;
mod streaming;
mod tail;
mod wal;
