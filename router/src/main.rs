mod batching;
mod client;
mod infer;
mod infer_types;
mod kv;

fn main() {}
