mod cache;
mod models;

fn main() {}
