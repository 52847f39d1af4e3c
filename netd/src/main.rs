fn main() {
    std::process::exit(netd::cli::main());
}
