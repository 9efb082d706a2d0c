mod infer_types;

fn main() {}
