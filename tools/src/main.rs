//! `cowlab-native [MIB]`: the native-Linux baselines (see the library).

fn main() {
    let mib: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("usage: cowlab-native [MIB]"))
        .unwrap_or(64);
    match cowlab_tools::measure(mib) {
        Ok(b) => println!("{}", b.json()),
        Err(e) => {
            eprintln!("cowlab-native: {e}");
            std::process::exit(1);
        }
    }
}
