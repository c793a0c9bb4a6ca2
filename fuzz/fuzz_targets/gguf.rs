//! A model file from arbitrary bytes through what the scheduler reads of it: the GGUF header,
//! metadata and tensor table (`GgufFile`), then the config, tokenizer and chat template
//! (`Frontend::load`). Every input must be refused with an error or accepted — never a panic,
//! a hang, or an allocation the file's size does not justify (run under `-rss_limit_mb`).
#![no_main]

use libfuzzer_sys::fuzz_target;

/// With `TANDEM_FUZZ_SEED_DIR` set, writes the seeds there first: a whole tiny synthetic model,
/// and its header alone (metadata and tensor table, where the parsing is).
fn write_seeds() {
    let Ok(dir) = std::env::var("TANDEM_FUZZ_SEED_DIR") else {
        return;
    };
    let dir = std::path::Path::new(&dir);
    std::fs::create_dir_all(dir).unwrap();
    let whole = dir.join("tiny.gguf");
    engine::synthetic::write(&engine::synthetic::TinySpec::default(), &whole).unwrap();
    let g = frontend::gguf::GgufFile::open(&whole).unwrap();
    let start = g.tensors().iter().map(|t| g.tensor_bytes(t).unwrap().as_ptr() as usize).min();
    let header = start.map_or(0, |p| p - g.bytes().as_ptr() as usize);
    std::fs::write(dir.join("tiny-header.gguf"), &g.bytes()[..header]).unwrap();
}

fuzz_target!(init: write_seeds(), |data: &[u8]| {
    let path = std::env::temp_dir().join(format!("tandem-fuzz-{}.gguf", std::process::id()));
    std::fs::write(&path, data).unwrap();
    if let Ok(g) = frontend::gguf::GgufFile::open(&path) {
        for t in g.tensors() {
            let _ = g.tensor_bytes(t);
        }
    }
    let _ = frontend::Frontend::load(&path, None, Default::default());
});
