use engine::{Engine, EngineConfig, KvDtype, LogitsWanted, Precision};
fn greedy(e: &Engine, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut seq = e.new_sequence();
    let mut tok =
        engine::sampler::argmax(&e.prefill(&mut seq, prompt, LogitsWanted::Last).unwrap());
    let mut out = vec![tok];
    while out.len() < n {
        tok = engine::sampler::argmax(&e.decode_step(&mut [(&mut seq, tok)]).unwrap()[0]);
        out.push(tok);
    }
    out
}
#[test]
fn sens() {
    let m = "/root/.cache/tandem/models/SmolLM2-135M-Instruct.Q4_1.gguf";
    let ld = |p, k| {
        Engine::load(
            m,
            &EngineConfig {
                precision: p,
                kv_dtype: k,
                ..Default::default()
            },
        )
        .unwrap()
    };
    let a = ld(Precision::W4A8, KvDtype::F16);
    let b = ld(Precision::W4A8, KvDtype::F32);
    let c = ld(Precision::F32, KvDtype::F32);
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string("tests/fixtures/greedy.json").unwrap())
            .unwrap();
    let (mut ab, mut ac, mut cref, mut aref) = (0, 0, 0, 0);
    for case in golden.as_array().unwrap() {
        let ids = |v: &serde_json::Value| -> Vec<u32> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        };
        let p = ids(&case["prompt_ids"]);
        let want = ids(&case["continuation"]);
        let (ga, gb, gc) = (greedy(&a, &p, 32), greedy(&b, &p, 32), greedy(&c, &p, 32));
        ab += (ga == gb) as usize;
        ac += (ga == gc) as usize;
        cref += (gc == want) as usize;
        aref += (ga == want) as usize;
    }
    eprintln!(
        "w4a8 f16kv = w4a8 f32kv: {ab}/8; w4a8 = f32: {ac}/8; f32 = llama.cpp: {cref}/8; w4a8 = llama.cpp {aref}/8"
    );
}
