//! Builds `lb-ebpf` for the BPF target with aya-build; `src/lib.rs` embeds
//! the object with `include_bytes_aligned!`.
//!
//! The BPF build uses the pinned toolchain (aya 0.16 needs Rust 1.98) with
//! `-Z build-std=core`, allowed on a stable toolchain by RUSTC_BOOTSTRAP=1.
//! `cargo xtask setup` installs the toolchain and bpf-linker.

/// The toolchain the BPF object is built with; `xtask` installs the same one.
const BPF_TOOLCHAIN: &str = "1.98.0";

fn main() -> anyhow::Result<()> {
    // aya-build passes `-Z build-std=core` when RUSTC_BOOTSTRAP is "1"; the
    // child cargo inherits it. Safe: build scripts are single-threaded here.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    let root_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../lb-ebpf");
    let lb_common_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../lb-common");
    println!("cargo:rerun-if-changed={lb_common_dir}");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "lb-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(BPF_TOOLCHAIN),
    )
}
