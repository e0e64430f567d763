//! The sink: the end of the mesh. Terminal results and dead letters become one row per request
//! in SQLite or PostgreSQL, committed in batches before their messages are acked, and served
//! over HTTP and gRPC.
pub mod api;
pub mod config;
pub mod consume;
pub mod grpc;
pub mod http;
pub mod row;
pub mod store;
pub mod writer;
