mod kernel;
fn main() {}
