//! Compiles the universe-word TLS slot (initial-exec TLS, which stable Rust cannot ask for).

fn main() {
    println!("cargo:rerun-if-changed=csrc/tls.c");
    cc::Build::new()
        .file("csrc/tls.c")
        .flag("-ftls-model=initial-exec")
        .warnings(true)
        .compile("kgpatch_redirect_tls");
}
