//! What loading a patch costs on the kmod side, on this binary as a large target (release
//! build with symbols). Prints a table: median of 9 runs of each operation, side by side with
//! a baseline that reads the whole file and scans symbols with `object`'s generic API.
//!
//! `cargo bench -p kgpatch-kmod --bench resolve`

use std::hint::black_box;
use std::time::{Duration, Instant};

use kgpatch_kmod::{
    describe_symbol, encode_manifest, loaded_objects, parse_manifest, BuildId, Callbacks,
    FunctionEntry, Manifest, RefKind, Reference, SymbolSpec, Target, TargetKind,
};
use object::{Object, ObjectSymbol};

const RUNS: usize = 9;

fn median(mut f: impl FnMut()) -> Duration {
    let mut times: Vec<Duration> = (0..RUNS)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    times.sort();
    times[RUNS / 2]
}

fn big_manifest(n: usize) -> Manifest {
    let spec = |i: usize| SymbolSpec {
        name: format!("function_number_{i}"),
        file: Some(format!("src/file_{i}.c")),
        index: None,
    };
    Manifest {
        format_version: 1,
        name: "bench".into(),
        version: "1".into(),
        description: "many entries".into(),
        target: Target {
            kind: TargetKind::Library {
                soname: "libbench.so.1".into(),
            },
            build_id: Some(BuildId(vec![7; 20])),
        },
        functions: (0..n)
            .map(|i| FunctionEntry {
                old: spec(i),
                expected_size: Some(100),
                checksum: Some(0x1234),
                new_symbol: format!("new_function_{i}"),
            })
            .collect(),
        references: (0..n)
            .map(|i| Reference {
                symbol: spec(i),
                kind: RefKind::Any,
                slot_offset: 0,
            })
            .collect(),
        callbacks: Callbacks::default(),
    }
}

fn main() {
    // KGPATCH_BENCH_TARGET=<file> [KGPATCH_BENCH_SYMBOL=<name>] to measure another target.
    let exe = match std::env::var_os("KGPATCH_BENCH_TARGET") {
        Some(p) => std::path::PathBuf::from(p),
        None => std::fs::read_link("/proc/self/exe").unwrap(),
    };
    let size = std::fs::metadata(&exe).unwrap().len();
    let data = std::fs::read(&exe).unwrap();
    let parsed = object::File::parse(&*data).unwrap();
    let nsyms = parsed
        .symbols()
        .count()
        .max(parsed.dynamic_symbols().count());
    drop(parsed);
    drop(data);
    println!(
        "target: {} ({:.1} MiB, {nsyms} symbols)\n",
        exe.display(),
        size as f64 / (1024.0 * 1024.0)
    );
    let name = std::env::var("KGPATCH_BENCH_SYMBOL").unwrap_or_else(|_| "main".into());
    let name = name.as_str();

    let ours = median(|| {
        black_box(describe_symbol(&exe, name, None).unwrap());
    });
    let baseline = median(|| {
        let data = std::fs::read(&exe).unwrap();
        let file = object::File::parse(&*data).unwrap();
        let sym = file
            .symbols()
            .find(|s| s.name() == Ok(name))
            .or_else(|| file.dynamic_symbols().find(|s| s.name() == Ok(name)))
            .unwrap();
        black_box(sym.address());
    });
    let objects = median(|| {
        black_box(loaded_objects());
    });
    let manifest = encode_manifest(&big_manifest(200));
    let parse = median(|| {
        black_box(parse_manifest(&manifest).unwrap());
    });

    println!("| operation | kmod | baseline |");
    println!("|---|---|---|");
    println!(
        "| find `{name}` + size + checksum in the target file | {ours:.2?} | {baseline:.2?} (read whole file, `object::File` symbol scan, no checksum) |"
    );
    println!("| loaded_objects() (dl_iterate_phdr + build-ids) | {objects:.2?} | - |");
    println!(
        "| parse_manifest, 200 functions + 200 refs ({} bytes) | {parse:.2?} | - |",
        manifest.len()
    );
}
