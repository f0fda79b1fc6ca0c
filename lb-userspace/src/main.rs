fn main() {
    println!("lb");
}
