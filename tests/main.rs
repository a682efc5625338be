//! The facade's integration tests, as one test binary: each binary would compile the whole
//! pipeline for the CPU backend again (about a minute each in release), and one binary halves
//! the CI build. Run one file's tests with a filter, such as
//! `cargo test --release --test integration serve_load:: -- --nocapture`.

mod common;

mod bad_input;
mod browser;
mod cache;
mod cli_video;
mod demo;
mod dit;
mod gen;
mod gen_plan_pool;
mod image_to_video;
mod lora;
mod low_mem;
mod memory_plan;
mod parallel;
mod parity_runner;
mod parity_scheduler;
mod precision;
mod serve;
mod serve_crash;
mod serve_load;
mod text;
mod vae;
