fn main() {
    eprintln!("lb-bench: not yet");
    std::process::exit(1);
}
