//! The `moegen generate` contract, run as a user runs it: output lines, resume, sampling seeds,
//! EOS stops, and clear errors with a non-zero exit for bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// A scratch directory for one test.
fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("moegen-cli-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The binary on the GPU adapter (`--device cpu` in `args` overrides it).
fn moegen(args: &[&str]) -> Output {
    moegen_with(args, &[("MOEGEN_DEVICE", "gpu")])
}

fn moegen_with(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_moegen"));
    c.args(args).env("XDG_RUNTIME_DIR", std::env::temp_dir()).env_remove("MOEGEN_DEVICE");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn lines(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn by_id(rows: &[Value], id: &Value) -> Value {
    rows.iter().find(|r| &r["id"] == id).cloned().unwrap_or_else(|| panic!("no output for id {id}"))
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[track_caller]
fn fails_with(out: &Output, says: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected a failure, stderr: {err}");
    assert!(!err.contains("panicked"), "a panic instead of an error: {err}");
    for s in says {
        assert!(err.contains(s), "stderr should mention {s:?}: {err}");
    }
}

const PROMPTS: &str = "{\"id\": 1, \"prompt_ids\": [5, 9, 100]}\n{\"id\": \"b\", \"prompt_ids\": [7], \"max_new_tokens\": 3}\n\n{\"id\": [2], \"prompt_ids\": [40, 41, 42, 43, 44, 45]}\n";

#[test]
fn writes_one_line_per_prompt_and_resumes() {
    let dir = scratch("resume");
    let input = write(&dir, "in.jsonl", PROMPTS);
    let out = dir.join("out.jsonl");
    let model = fixture("mixtral-f32");
    let run = |extra: &[&str]| {
        let mut args = vec!["generate", "--model", path(&model), "--input", path(&input), "--output", path(&out), "--max-new-tokens", "4", "--ignore-eos", "--quiet"];
        args.extend_from_slice(extra);
        moegen(&args)
    };
    let o = run(&[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let first = lines(&out);
    assert_eq!(first.len(), 3);
    let b = by_id(&first, &Value::from("b"));
    assert_eq!(b["output_ids"].as_array().unwrap().len(), 3, "the line's own max_new_tokens wins");
    assert_eq!(b["prompt_tokens"], 1);
    assert_eq!(b["finish_reason"], "length");
    assert!(b["text"].is_string());
    let summary = String::from_utf8_lossy(&o.stderr);
    assert!(summary.contains("3 prompts") && summary.contains("tokens/s"), "{summary}");

    // Keep the first line and half of the second, as an interrupted run would leave them.
    let text = std::fs::read_to_string(&out).unwrap();
    let cut = text.find('\n').unwrap() + 1 + 10;
    std::fs::write(&out, &text[..cut]).unwrap();
    let o = run(&["--resume"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let resumed = lines(&out);
    assert_eq!(resumed.len(), 3, "each id exactly once after resuming");
    for row in &first {
        assert_eq!(&by_id(&resumed, &row["id"]), row, "greedy results are the same after resuming");
    }
    assert!(String::from_utf8_lossy(&o.stderr).contains("1 already done"));
}

#[test]
fn same_seed_same_samples_whatever_the_batch() {
    let dir = scratch("seed");
    let model = fixture("qwen3-moe-f16");
    let alone = write(&dir, "alone.jsonl", "{\"id\": \"x\", \"prompt_ids\": [11, 12, 13]}\n");
    let crowd = write(
        &dir,
        "crowd.jsonl",
        "{\"id\": \"y\", \"prompt_ids\": [90, 91, 92, 93, 94, 95, 96]}\n{\"id\": \"x\", \"prompt_ids\": [11, 12, 13]}\n{\"id\": \"z\", \"prompt_ids\": [200]}\n",
    );
    let sample = |input: &Path, seed: &str, name: &str| {
        let out = dir.join(name);
        let o = moegen(&[
            "generate", "--model", path(&model), "--input", path(input), "--output", path(&out), "--max-new-tokens", "12",
            "--temperature", "0.9", "--top-k", "50", "--top-p", "0.95", "--seed", seed, "--ignore-eos", "--quiet",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        by_id(&lines(&out), &Value::from("x"))["output_ids"].clone()
    };
    let a = sample(&alone, "7", "a.jsonl");
    assert_eq!(a, sample(&alone, "7", "b.jsonl"), "same seed, same output");
    assert_eq!(a, sample(&crowd, "7", "c.jsonl"), "same seed, same output in another batch");
    assert_ne!(a, sample(&alone, "8", "d.jsonl"), "another seed, another output");
}

#[test]
fn stops_at_eos_unless_told_not_to() {
    // Make a greedy token of a fixture prompt (the first that did not come earlier) the EOS.
    let dir = scratch("eos");
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    let src = fixture("olmoe-bf16");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), model.join(f)).unwrap();
    }
    let expected: Value = serde_json::from_str(&std::fs::read_to_string(src.join("expected.json")).unwrap()).unwrap();
    let (prompt, greedy, at) = (0..4)
        .find_map(|p| {
            let greedy = expected["greedy"][p].as_array().unwrap().clone();
            let at = (1..greedy.len()).find(|&i| !greedy[..i].contains(&greedy[i]))?;
            Some((expected["prompts"][p].clone(), greedy, at))
        })
        .expect("a continuation with a token that did not come earlier");
    let eos = greedy[at].clone();
    write(&model, "generation_config.json", &format!("{{\"eos_token_id\": [{eos}, 9999]}}"));
    let input = write(&dir, "in.jsonl", &format!("{{\"id\": 0, \"prompt_ids\": {prompt}}}\n"));
    let run = |extra: &[&str]| {
        let out = dir.join("out.jsonl");
        let mut args = vec!["generate", "--model", path(&model), "--input", path(&input), "--output", path(&out), "--max-new-tokens", "8", "--quiet"];
        args.extend_from_slice(extra);
        let o = moegen(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        lines(&out).remove(0)
    };
    let stopped = run(&[]);
    assert_eq!(stopped["finish_reason"], "stop");
    let ids = stopped["output_ids"].as_array().unwrap();
    assert_eq!(ids.len(), at + 1, "stops at the EOS, which is included: {ids:?}");
    assert_eq!(ids[at], eos);
    let ignored = run(&["--ignore-eos"]);
    assert_eq!(ignored["finish_reason"], "length");
    assert_eq!(ignored["output_ids"].as_array().unwrap().len(), 8);
}

#[test]
fn bad_input_is_a_clear_error() {
    let dir = scratch("bad");
    let model = fixture("mixtral-f32");
    let m = path(&model);
    let run = |input: &str, extra: &[&str]| {
        let p = write(&dir, "in.jsonl", input);
        let mut args = vec!["generate", "--model", m, "--input", path(&p), "--quiet"];
        args.extend_from_slice(extra);
        moegen(&args)
    };
    fails_with(&run("{\"id\": 1, \"prompt_ids\": [1]}\n{\"id\": 2, \"prompt_ids\": [1,\n", &[]), &["in.jsonl:2", "JSON"]);
    fails_with(&run("{\"id\": 1, \"prompt_ids\": [1, 256]}\n", &[]), &["in.jsonl:1", "256", "vocabulary"]);
    let long: Vec<String> = (0..600).map(|i| (i % 200 + 3).to_string()).collect();
    fails_with(&run(&format!("{{\"id\": 1, \"prompt_ids\": [{}]}}\n", long.join(",")), &[]), &["in.jsonl:1", "600 tokens", "context"]);
    fails_with(&run("{\"id\": 1, \"prompt\": \"text\"}\n", &[]), &["in.jsonl:1", "tokenizer.json"]);
    fails_with(&run("{\"id\": 1, \"prompt_ids\": [3]}\n{\"id\": 1, \"prompt_ids\": [4]}\n", &[]), &["in.jsonl:2", "twice"]);
    fails_with(&run("{\"id\": 1, \"prompt_ids\": [3]}\n", &["--top-p", "0"]), &["--top-p"]);
    fails_with(&run("{\"id\": 1, \"prompt_ids\": [3]}\n", &["--temperature=-1"]), &["--temperature"]);
    fails_with(&run("{\"id\": 1, \"prompt_ids\": [3]}\n", &["--output", "/nonexistent-dir/out.jsonl"]), &["/nonexistent-dir/out.jsonl"]);
    let missing = dir.join("nope.jsonl");
    fails_with(&moegen(&["generate", "--model", m, "--input", path(&missing)]), &["nope.jsonl"]);
}

#[test]
fn broken_checkpoints_are_named() {
    let dir = scratch("checkpoint");
    let src = fixture("mixtral-f32");
    let input = write(&dir, "in.jsonl", "{\"id\": 1, \"prompt_ids\": [3, 4]}\n");
    let copy = |name: &str| {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        for f in ["config.json", "generation_config.json", "model.safetensors"] {
            std::fs::copy(src.join(f), d.join(f)).unwrap();
        }
        d
    };
    let run = |model: &Path| moegen(&["generate", "--model", path(model), "--input", path(&input), "--quiet"]);

    let truncated = copy("truncated");
    let bytes = std::fs::read(truncated.join("model.safetensors")).unwrap();
    std::fs::write(truncated.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    fails_with(&run(&truncated), &["model.safetensors", "truncated"]);

    let wrong_shape = copy("shape");
    let cfg = std::fs::read_to_string(wrong_shape.join("config.json")).unwrap();
    std::fs::write(wrong_shape.join("config.json"), cfg.replace("\"intermediate_size\": 96", "\"intermediate_size\": 95")).unwrap();
    fails_with(&run(&wrong_shape), &["experts.0.w1.weight", "shape"]);

    let bad_config = copy("config");
    std::fs::write(bad_config.join("config.json"), "{\"architectures\": [\"MixtralForCausalLM\"], ").unwrap();
    fails_with(&run(&bad_config), &["config.json", "JSON"]);

    let unknown = copy("arch");
    let cfg = std::fs::read_to_string(unknown.join("config.json")).unwrap();
    std::fs::write(unknown.join("config.json"), cfg.replace("MixtralForCausalLM", "GPT2LMHeadModel")).unwrap();
    fails_with(&run(&unknown), &["GPT2LMHeadModel", "MixtralForCausalLM", "OlmoeForCausalLM"]);

    let no_weights = copy("weights");
    std::fs::remove_file(no_weights.join("model.safetensors")).unwrap();
    fails_with(&run(&no_weights), &["model.safetensors"]);
}

#[test]
fn a_gpu_budget_streams_experts_with_the_same_results() {
    let dir = scratch("budget");
    let model = fixture("mixtral-bf16-sharded");
    let input = write(&dir, "in.jsonl", PROMPTS);
    let run = |extra: &[&str], name: &str| {
        let out = dir.join(name);
        let mut args = vec!["generate", "--model", path(&model), "--input", path(&input), "--output", path(&out), "--max-new-tokens", "6", "--ignore-eos", "--quiet"];
        args.extend_from_slice(extra);
        let o = moegen(&args);
        (o, out)
    };
    let (o, resident) = run(&[], "resident.jsonl");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (o, streamed) = run(&["--gpu-memory", "420KiB"], "streamed.jsonl");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("3 streamed from host memory through"), "{err}");
    let (a, b) = (lines(&resident), lines(&streamed));
    for row in &a {
        assert_eq!(&by_id(&b, &row["id"]), row, "streaming changed a result");
    }
    // Streamed experts computed on the host instead: the same file, and the summary says so.
    let (o, never) = run(&["--gpu-memory", "420KiB", "--cpu-experts", "never"], "never.jsonl");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (o, always) = run(&["--gpu-memory", "420KiB", "--cpu-experts", "always"], "always.jsonl");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && !err.contains(" 0 computed on the host"), "{err}");
    assert_eq!(std::fs::read(&never).unwrap(), std::fs::read(&always).unwrap(), "--cpu-experts always and never wrote different files");
    let (o, _) = run(&["--cpu-experts", "sometimes"], "bad-experts.jsonl");
    fails_with(&o, &["--cpu-experts", "sometimes"]);
    let (o, _) = run(&["--gpu-memory", "100KiB"], "small.jsonl");
    fails_with(&o, &["--gpu-memory", "minimum"]);
    let (o, _) = run(&["--gpu-memory", "lots"], "bad.jsonl");
    fails_with(&o, &["--gpu-memory", "lots"]);
    let (o, _) = run(&["--upload-bandwidth", "4MB"], "rate.jsonl");
    fails_with(&o, &["--upload-bandwidth", "4MB/s"]);
}

#[test]
fn the_default_model_completes_the_sample_prompts_readably() {
    for device in ["gpu", "cpu"] {
        check_default_model(&moegen(&["--device", device, "generate", "--max-new-tokens", "12", "--quiet"]));
    }
}

/// A machine without any GPU driver (here: asked for a backend this build lacks, so no adapter
/// is found): the default command runs on the CPU and says so; asking for a GPU is an error
/// with the hint.
#[test]
fn without_a_gpu_driver_the_default_command_runs_on_the_cpu() {
    let no_driver = [("WGPU_BACKEND", "gl")];
    let o = moegen_with(&["generate", "--max-new-tokens", "6", "--quiet"], &no_driver);
    check_default_model(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no GPU adapter found, running on the CPU") && err.contains("install its driver"), "{err}");
    fails_with(&moegen_with(&["--device", "gpu", "generate", "--quiet"], &no_driver), &["no GPU adapter", "mesa-vulkan-drivers"]);
    let o = moegen_with(&["devices"], &no_driver);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && out.contains("[cpu]") && out.contains("vector paths: portable") && out.contains("selected: CPU"), "{out}");
    // With only a software adapter (llvmpipe, as in CI) `auto` takes the CPU too, and says that
    // an adapter was found but not a hardware one.
    let o = moegen_with(&["generate", "--max-new-tokens", "2", "--quiet"], &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    if err.contains("the software adapter") {
        assert!(err.contains("no hardware GPU adapter found, running on the CPU") && err.contains("--device gpu takes it"), "{err}");
    }
}

/// `--cpu-compute bf16` where the CPU can (the plan's hardware line says so, `devices` too), and
/// where it cannot (the avx2 path forced): a warning saying why, and the job runs in f32.
#[test]
fn cpu_compute_bf16_is_used_where_the_cpu_has_it_and_explained_where_not() {
    let plan = ["--device", "cpu", "--cpu-compute", "bf16", "plan", "--synthetic", "ci-small", "--sequences", "4"];
    let narrowed = moegen_with(&plan, &[("MOEGEN_CPU_ISA", "avx2")]);
    let err = String::from_utf8_lossy(&narrowed.stderr);
    assert!(narrowed.status.success() && err.contains("warning: --cpu-compute bf16 needs AVX512-BF16") && err.contains("stay in f32"), "{err}");
    assert!(!String::from_utf8_lossy(&narrowed.stdout).contains("bf16 products"), "the warning's f32 is what runs");
    if moegen::cpu::bf16_products::supported() {
        let o = moegen_with(&plan, &[]);
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success() && out.contains("avx512 with bf16 products"), "{out}{}", String::from_utf8_lossy(&o.stderr));
        let o = moegen_with(&["--cpu-compute", "bf16", "devices"], &[]);
        let devices = String::from_utf8_lossy(&o.stdout);
        assert!(devices.lines().any(|l| l.trim_start().starts_with("bf16 products (") && l.trim_end().ends_with("): in use")), "{devices}");
    }
    let o = moegen_with(
        &["--device", "cpu", "--cpu-compute", "bf16", "bench", "--synthetic", "ci-small", "--sequences", "2", "--prompt-len", "3", "--new-tokens", "2", "--batching", "model", "--json"],
        &[],
    );
    let row: Value = serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("")).unwrap();
    let want = if moegen::cpu::bf16_products::supported() { "bf16" } else { "f32" };
    assert!(row["device"] == "cpu" && row["cpu_compute"] == want, "the JSON says what ran: {row}");
    fails_with(&moegen_with(&["--cpu-compute", "f8", "devices"], &[]), &["--cpu-compute", "f8"]);
}

/// On `--device cpu` there is no GPU: the plan, the summary, the bench table and the trace's
/// tracks name the CPU device (its memory is host memory, its compute the host's).
#[test]
fn on_the_cpu_device_the_messages_name_the_cpu_device_and_no_gpu() {
    let dir = scratch("cpu-words");
    let trace = dir.join("t.json");
    let plan = moegen_with(&["--device", "cpu", "plan", "--synthetic", "ci-small", "--batching", "all", "--sequences", "6", "--gpu-memory", "1MiB"], &[]);
    let bench = moegen_with(
        &["--device", "cpu", "bench", "--synthetic", "ci-small", "--batching", "all", "--sequences", "4", "--prompt-len", "3", "--new-tokens", "2", "--trace", path(&trace)],
        &[],
    );
    for o in [&plan, &bench] {
        let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        assert!(o.status.success(), "{text}");
        // The bound is the CPU device's compute or the host's own work, whichever the calibration makes larger.
        assert!(text.contains("CPU device memory") && text.contains("CPU device budget"), "{text}");
        assert!(text.contains("limited by CPU device") || text.contains("limited by host work"), "{text}");
        assert!(!text.contains("GPU"), "a message names a GPU on the CPU device: {text}");
    }
    let table = String::from_utf8_lossy(&bench.stdout);
    assert!(table.contains("device") && table.contains("busy") && table.contains("copied in") && !table.contains("uploaded"), "{table}");
    // Nothing crosses a link on the CPU device: the summary says copies, not uploads.
    let summary = String::from_utf8_lossy(&bench.stderr);
    assert!(summary.contains("copied to the CPU device") && summary.contains("copied back") && !summary.contains("uploaded"), "{summary}");
    let t: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("t.module.json")).unwrap()).unwrap();
    let tracks: Vec<&str> = t["traceEvents"].as_array().unwrap().iter().filter(|e| e["ph"] == "M").map(|e| e["args"]["name"].as_str().unwrap()).collect();
    assert!(tracks.contains(&"CPU device compute") && !tracks.iter().any(|t| t.contains("GPU")), "{tracks:?}");
}

fn check_default_model(o: &Output) {
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let prompts = std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/prompts.jsonl")).unwrap();
    let n = prompts.lines().filter(|l| !l.trim().is_empty()).count();
    assert_eq!(out.matches("--- ").count(), n, "one completion per sample prompt:\n{out}");
    // Each prompt comes back with its completion after it, in order.
    let mut at = 0;
    for line in prompts.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        let prompt = v["prompt"].as_str().unwrap();
        let found = out[at..].find(prompt).unwrap_or_else(|| panic!("prompt {prompt:?} not echoed in order:\n{out}"));
        at += found + prompt.len();
    }
    // Readable text, not noise: mostly letters, spaces and punctuation, no replacement characters.
    assert!(!out.contains('\u{fffd}'));
    let letters = out.chars().filter(|c| c.is_ascii_alphabetic() || *c == ' ').count();
    assert!(letters * 2 > out.len(), "{out}");
}

#[test]
fn the_three_batching_policies_give_the_same_results() {
    let dir = scratch("policies");
    let model = fixture("qwen2-moe-bf16");
    let input = write(&dir, "in.jsonl", PROMPTS);
    let mut outputs = Vec::new();
    for (device, policy, budget) in [("gpu", "module", "600KiB"), ("gpu", "model", "600KiB"), ("gpu", "continuous", "600KiB"), ("gpu", "module", "64MiB"), ("cpu", "module", "600KiB"), ("cpu", "model", "600KiB"), ("cpu", "continuous", "64MiB")] {
        let out = dir.join(format!("{device}-{policy}-{budget}.jsonl"));
        let o = moegen(&[
            "--device", device, "generate", "--model", path(&model), "--input", path(&input), "--output", path(&out), "--max-new-tokens", "5",
            "--ignore-eos", "--quiet", "--batching", policy, "--gpu-memory", budget,
        ]);
        assert!(o.status.success(), "{policy}: {}", String::from_utf8_lossy(&o.stderr));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(&format!("batching {policy}")) && err.contains("predicted"), "{err}");
        let mut rows = lines(&out);
        rows.sort_by_key(|r| r["id"].to_string());
        outputs.push(rows);
    }
    for o in &outputs[1..] {
        assert_eq!(o, &outputs[0], "a batching policy, budget or device changed the results");
    }
    let o = moegen(&["generate", "--model", path(&model), "--input", path(&input), "--quiet", "--host-memory", "1KiB"]);
    fails_with(&o, &["--host-memory", "minimum"]);
    let o = moegen(&["generate", "--model", path(&model), "--input", path(&input), "--quiet", "--batching", "fifo"]);
    fails_with(&o, &["--batching", "fifo"]);
}

#[test]
fn bench_reports_each_policy_as_json_and_writes_traces() {
    let dir = scratch("bench");
    let trace = dir.join("t.json");
    let o = moegen(&[
        "bench", "--synthetic", "ci-small", "--batching", "all", "--gpu-memory", "1MiB", "--sequences", "6", "--prompt-len", "5",
        "--new-tokens", "3", "--json", "--trace", path(&trace),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows: Vec<Value> = String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let names: Vec<&str> = rows.iter().map(|r| r["batching"].as_str().unwrap()).collect();
    assert_eq!(names, ["model", "continuous", "module"]);
    for r in &rows {
        for key in ["tokens_per_s", "prefill_tokens_per_s", "decode_tokens_per_s", "gpu_busy_fraction", "predicted_tokens_per_s"] {
            assert!(r[key].as_f64().is_some_and(|v| v > 0.0 && v.is_finite()), "{key} in {r}");
        }
        assert!(r["bytes_uploaded"].as_u64().unwrap() > 0, "experts stream under a 1 MiB budget: {r}");
        assert!(r["device"] == "gpu" && r["cpu_compute"] == "f32", "{r}");
        let t: Value = serde_json::from_str(&std::fs::read_to_string(dir.join(format!("t.{}.json", r["batching"].as_str().unwrap()))).unwrap()).unwrap();
        let events = t["traceEvents"].as_array().unwrap();
        let on = |tid: u64| events.iter().filter(|e| e["ph"] == "X" && e["tid"] == tid).count();
        assert!(on(0) > 0 && on(1) > 0, "upload and compute tracks both have events");
    }
    let o = moegen(&["bench", "--synthetic", "nope"]);
    fails_with(&o, &["--synthetic", "nope", "ci-small", "mixtral-8x7b"]);
}

#[test]
fn attention_placements_write_identical_files_and_report_where_they_ran() {
    let dir = scratch("attention");
    let model = fixture("mixtral-f32");
    let input = write(&dir, "in.jsonl", PROMPTS);
    let mut files = Vec::new();
    for site in ["gpu", "host", "split"] {
        let out = dir.join(format!("{site}.jsonl"));
        let o = moegen(&[
            "generate", "--model", path(&model), "--input", path(&input), "--output", path(&out), "--max-new-tokens", "6",
            "--ignore-eos", "--quiet", "--batching", "module", "--gpu-memory", "2MiB", "--attention", site,
        ]);
        assert!(o.status.success(), "{site}: {}", String::from_utf8_lossy(&o.stderr));
        let err = String::from_utf8_lossy(&o.stderr);
        let said = match site {
            "gpu" => "attention on the GPU",
            "host" => "attention on the host",
            _ => "attention split",
        };
        assert!(err.contains(said), "{site}: the plan and summary say where attention ran: {err}");
        files.push(std::fs::read(&out).unwrap());
    }
    assert!(files[1] == files[0] && files[2] == files[0], "the attention placements wrote different files");

    // bench: where attention ran, what came back, and the host attention track of the trace.
    let trace = dir.join("t.json");
    let bench = |site: &str| -> Value {
        let o = moegen(&[
            "bench", "--synthetic", "ci-small", "--batching", "module", "--gpu-memory", "700KiB", "--sequences", "8", "--prompt-len", "12",
            "--new-tokens", "4", "--json", "--attention", site, "--trace", path(&trace),
        ]);
        assert!(o.status.success(), "{site}: {}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().next().unwrap()).unwrap()
    };
    let host = bench("host");
    assert_eq!(host["attention"]["site"], "host", "{host}");
    assert_eq!(host["attention"]["host_share"], 1.0, "{host}");
    assert!(host["bytes_downloaded"].as_u64().unwrap() > 0, "{host}");
    let t: Value = serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    let events = t["traceEvents"].as_array().unwrap();
    let on = |tid: u64| events.iter().filter(|e| e["ph"] == "X" && e["tid"] == tid).count();
    assert!(on(2) > 0 && on(1) > 0, "host attention and GPU tracks both have events");
    assert!(events.iter().any(|e| e["ph"] == "M" && e["args"]["name"] == "host attention"));
    let gpu = bench("gpu");
    assert_eq!(gpu["attention"]["site"], "gpu", "{gpu}");
    // Host attention sends no KV pages up: fewer bytes go to the GPU than with GPU attention.
    assert!(host["bytes_uploaded"].as_u64() < gpu["bytes_uploaded"].as_u64(), "host {host} gpu {gpu}");
    let split = bench("split");
    let share = split["attention"]["host_share"].as_f64().unwrap();
    assert!(split["attention"]["site"] == "split" && share > 0.0 && share < 1.0, "{split}");
    fails_with(&moegen(&["bench", "--attention", "cpu"]), &["--attention", "cpu"]);
    // The plan says where attention runs.
    let o = moegen(&["plan", "--synthetic", "ci-small", "--batching", "module", "--gpu-memory", "700KiB", "--attention", "host"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("attention on the host"), "{}", String::from_utf8_lossy(&o.stdout));
}

#[test]
fn bf16_kv_halves_the_kv_pages_sent() {
    // Module-based with host KV pages: the same job with 16-bit pages sends fewer bytes (the
    // hidden states are the same), and the plan says which precision the pages hold.
    let run = |dtype: &str| -> u64 {
        let o = moegen(&[
            "bench", "--synthetic", "ci-small", "--batching", "module", "--gpu-memory", "700KiB", "--sequences", "8", "--prompt-len", "12",
            "--new-tokens", "4", "--json", "--kv-dtype", dtype, "--attention", "gpu",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let r: Value = serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().next().unwrap()).unwrap();
        r["bytes_uploaded"].as_u64().unwrap()
    };
    let (full, half) = (run("f32"), run("bf16"));
    assert!(half < full, "bf16 pages sent {half} bytes, f32 {full}");
    let o = moegen(&["plan", "--synthetic", "ci-small", "--batching", "module", "--gpu-memory", "700KiB", "--sequences", "512", "--kv-dtype", "bf16"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("tokens (bf16)"), "{}", String::from_utf8_lossy(&o.stdout));
    fails_with(&moegen(&["plan", "--kv-dtype", "f8"]), &["--kv-dtype", "f8"]);
}

#[test]
fn plan_predicts_real_shapes_from_a_hardware_file() {
    let hw = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/hardware/rtx-a5000-pcie4.json");
    let o = moegen(&["plan", "--synthetic", "mixtral-8x7b", "--hardware", path(&hw), "--sequences", "4096", "--prompt-len", "512", "--new-tokens", "256"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(text.matches("predicted").count(), 3, "{text}");
    assert!(text.contains("limited by host-to-GPU link") || text.contains("limited by GPU compute"), "{text}");
    assert!(text.contains("population") && text.contains("RTX A5000"), "{text}");
    let o = moegen(&["plan", "--synthetic", "mixtral-8x7b", "--hardware", path(&hw), "--gpu-memory", "1GiB"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("below the minimum"), "a budget under one layer's attention and two experts is refused: {text}");
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("no batching policy fits"), "and the plan exits non-zero");
    let bad = scratch("plan").join("hw.json");
    std::fs::write(&bad, "{\"name\": 1}").unwrap();
    fails_with(&moegen(&["plan", "--synthetic", "ci-small", "--hardware", path(&bad)]), &["hw.json", "hardware profile"]);
}

#[test]
fn deepseek_plans_and_runs_with_fp8_weights_and_a_latent_cache() {
    // DeepSeek-V3's shapes: FP8 experts (128-wide blocks) stay FP8 on the GPU too, an f32 scale
    // before each block's run of a row: 44M values in 43.3 MiB everywhere; the plan fits 1 TiB.
    let hw = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/hardware/rtx-a5000-pcie4.json");
    let o = moegen(&["plan", "--synthetic", "deepseek-v3", "--hardware", path(&hw), "--host-memory", "1TiB", "--batching", "module"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("experts of 43.3 MiB each)") && !text.contains("over the link (FP8)"), "{text}");
    assert!(text.contains("predicted") && text.contains("population"), "{text}");
    // The CI-sized DeepSeek runs end to end under every policy, experts streamed as FP8.
    let o = moegen(&[
        "bench", "--synthetic", "deepseek-small", "--gpu-memory", "3MiB", "--sequences", "6", "--prompt-len", "5", "--new-tokens", "3", "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows: Vec<Value> = String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 3, "{rows:?}");
    for r in &rows {
        assert!(r["tokens_per_s"].as_f64().is_some_and(|v| v > 0.0), "{r}");
        assert!(r["bytes_uploaded"].as_u64().unwrap() > 0, "the experts should stream under 3 MiB: {r}");
    }
    // The FP8 DeepSeek-V3 fixture through `generate` from token ids: every policy writes the same
    // file, and its tokens are transformers' greedy ones.
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/deepseek-v3-fp8");
    let expected: Value = serde_json::from_str(&std::fs::read_to_string(fixture.join("expected.json")).unwrap()).unwrap();
    let dir = scratch("deepseek");
    let input = dir.join("prompts.jsonl");
    let lines: Vec<String> = expected["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, p)| serde_json::json!({"id": i, "prompt_ids": p, "max_new_tokens": 8}).to_string())
        .collect();
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let mut files = Vec::new();
    for b in ["module", "model", "continuous"] {
        let out = dir.join(format!("{b}.jsonl"));
        let o = moegen(&["generate", "--model", path(&fixture), "--input", path(&input), "--output", path(&out), "--ignore-eos", "--batching", b, "--gpu-memory", "600KiB", "--quiet"]);
        assert!(o.status.success(), "{b}: {}", String::from_utf8_lossy(&o.stderr));
        files.push(std::fs::read_to_string(&out).unwrap());
    }
    assert!(files.iter().all(|f| *f == files[0]), "policies wrote different files");
    for (line, want) in files[0].lines().zip(expected["greedy"].as_array().unwrap()) {
        let got: Value = serde_json::from_str(line).unwrap();
        assert_eq!(&got["output_ids"], want, "{line}");
    }
}

/// A GGUF file runs as its safetensors source does (same tokens), `--quantize` runs and refuses
/// dimensions that are not whole blocks, and a broken GGUF file is an error naming it, with
/// nothing written.
#[test]
fn gguf_models_and_quantised_experts_run_from_the_command_line() {
    let dir = scratch("gguf");
    let input = write(&dir, "in.jsonl", "{\"id\": 1, \"prompt_ids\": [3, 4, 5]}\n{\"id\": 2, \"prompt_ids\": [9]}\n");
    let run = |model: &Path, out: &Path, extra: &[&str]| {
        let mut args = vec!["generate", "--model", path(model), "--input", path(&input), "--output", path(out), "--max-new-tokens", "5", "--ignore-eos", "--quiet"];
        args.extend_from_slice(extra);
        moegen(&args)
    };
    let (a, b) = (dir.join("safetensors.jsonl"), dir.join("gguf.jsonl"));
    let o = run(&fixture("mixtral-f32"), &a, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = run(&fixture("gguf/mixtral-f32.gguf"), &b, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ids = |p: &Path| lines(p).iter().map(|l| (l["id"].clone(), l["output_ids"].clone())).collect::<Vec<_>>();
    assert_eq!(ids(&a), ids(&b), "the GGUF conversion generates other tokens");

    // Q8_0 experts on a 256-wide model, on both devices: the same file.
    let q = fixture("gguf/mixtral-256-q5_k_m.gguf");
    let (c, d) = (dir.join("q-gpu.jsonl"), dir.join("q-cpu.jsonl"));
    let o = run(&q, &c, &["--quantize", "q8_0", "--gpu-memory", "1500KiB"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = run(&q, &d, &["--quantize", "q8_0", "--device", "cpu"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(ids(&c), ids(&d));

    let refused = dir.join("refused.jsonl");
    fails_with(&run(&fixture("mixtral-f32"), &refused, &["--quantize", "q4_k"]), &["--quantize", "q4_k", "256", "64"]);
    assert!(!refused.exists(), "the output was created before the input was known to be good");

    let broken = dir.join("broken.gguf");
    let bytes = std::fs::read(fixture("gguf/olmoe-bf16.gguf")).unwrap();
    std::fs::write(&broken, &bytes[..bytes.len() - 1000]).unwrap();
    fails_with(&run(&broken, &refused, &[]), &["broken.gguf", "truncated"]);
    assert!(!refused.exists());
}

/// A job of both formats on the default model (it has a tokenizer): OpenAI chat and completion
/// lines with their own sampling, stops and logprobs, an error line, moegen's own lines.
const MIXED_JOB: &str = r#"{"custom_id": "chat-1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write a function"}], "max_tokens": 12, "temperature": 0, "logprobs": true, "top_logprobs": 2}}
{"custom_id": "cmp-1", "method": "POST", "url": "/v1/completions", "body": {"prompt": "def add(a, b):\n", "max_tokens": 16, "temperature": 0.8, "seed": 5, "n": 2, "stop": ["\n\n"], "logprobs": 1}}
{"custom_id": "bad-1", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}}
{"custom_id": "cmp-2", "method": "POST", "url": "/v1/completions", "body": {"prompt": "import os\n", "max_tokens": 10, "top_p": 0.9, "top_k": 20}}
{"id": 7, "prompt": "import os\n", "max_new_tokens": 10, "stop": ["os"]}
{"id": 8, "prompt": "class Stack:\n", "max_new_tokens": 9, "temperature": 0.7, "seed": 3}
"#;

fn run_default(input: &Path, output: &Path, extra: &[&str]) -> Output {
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/default-model");
    let template = fixture("chat/templates/mistralai-Mistral-Nemo-Instruct-2407.jinja");
    let mut args = vec!["--device", "cpu", "generate", "--model", path(&model), "--input", path(input), "--output", path(output)];
    args.extend_from_slice(&["--chat-template", path(&template), "--quiet"]);
    args.extend_from_slice(extra);
    moegen_with(&args, &[("SOURCE_DATE_EPOCH", "1700000000")])
}

#[test]
fn openai_batch_lines_run_each_with_its_own_sampling_alone_or_together() {
    let dir = scratch("openai");
    let input = write(&dir, "in.jsonl", MIXED_JOB);
    let together = dir.join("together.jsonl");
    let o = run_default(&input, &together, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows = lines(&together);
    assert_eq!(rows.len(), 6);
    let by = |id: &str| rows.iter().find(|r| r["custom_id"] == id || r["id"] == id || r["id"].as_u64().is_some_and(|n| n.to_string() == id)).cloned().unwrap();
    assert_eq!(by("bad-1")["response"], Value::Null);
    assert!(by("bad-1")["error"]["message"].as_str().unwrap().contains("/v1/embeddings"));
    let chat = &by("chat-1")["response"]["body"];
    assert_eq!((chat["object"].as_str(), chat["created"].as_u64()), (Some("chat.completion"), Some(1_700_000_000)));
    let content = chat["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), chat["usage"]["completion_tokens"].as_u64().unwrap() as usize);
    assert!(content.iter().all(|c| c["top_logprobs"].as_array().unwrap().len() == 2 && c["logprob"].as_f64().unwrap() <= 0.0));
    let cmp = &by("cmp-1")["response"]["body"];
    assert_eq!(cmp["choices"].as_array().unwrap().len(), 2);
    for c in cmp["choices"].as_array().unwrap() {
        assert!(!c["text"].as_str().unwrap().contains("\n\n"), "the stop string is cut: {c}");
    }
    let seven = by("7");
    assert!(!seven["text"].as_str().unwrap().contains("os") && seven["finish_reason"] == "stop", "{seven}");

    // Each line alone gives the same line: nothing depends on the batch it ran in.
    for (i, text) in MIXED_JOB.lines().enumerate() {
        let one = write(&dir, &format!("one-{i}.jsonl"), &format!("{text}\n"));
        let out = dir.join(format!("one-{i}.out.jsonl"));
        let o = run_default(&one, &out, &[]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let alone = lines(&out).remove(0);
        let id = alone.get("custom_id").unwrap_or(&alone["id"]);
        let with_others = rows.iter().find(|r| r.get("custom_id").unwrap_or(&r["id"]) == id).unwrap();
        assert_eq!(&alone, with_others, "line {i} alone");
    }

    // The openai package's own types parse every line (scripts/test.sh provides the package).
    match std::env::var("MOEGEN_OPENAI_PYTHON") {
        Ok(py) => {
            let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/check_openai_output.py");
            let o = Command::new(py).arg(&script).arg(&together).output().unwrap();
            assert!(o.status.success(), "openai types refused the output: {}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        }
        Err(_) => eprintln!("MOEGEN_OPENAI_PYTHON is unset: the openai package check is skipped (scripts/test.sh sets it)"),
    }
}

/// `count` moegen lines `p0`, `p1`, ... of code to continue, line i asking for `new_tokens(i)`
/// tokens; every `sample_every`-th line samples at `temperature`, the others are greedy.
fn code_prompts(count: usize, new_tokens: impl Fn(usize) -> usize, sample_every: usize, temperature: f32) -> String {
    (0..count)
        .map(|i| {
            let t = if i % sample_every == 0 { format!(", \"temperature\": {temperature}") } else { String::new() };
            format!("{{\"id\": \"p{i}\", \"prompt\": \"def f{i}(x):\\n\", \"max_new_tokens\": {}{t}}}\n", new_tokens(i))
        })
        .collect()
}

/// The default model on the CPU device over `input` into `output`, started and left running
/// (stderr kept), in steps of at most 8 tokens.
fn spawn_default(input: &Path, output: &Path) -> std::process::Child {
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/default-model");
    Command::new(env!("CARGO_BIN_EXE_moegen"))
        .args(["--device", "cpu", "generate", "--model", path(&model), "--input", path(input), "--output", path(output), "--quiet", "--max-step-tokens", "8"])
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn shards_merged_equal_one_process_and_resume_after_a_kill() {
    let dir = scratch("shards");
    let input = write(&dir, "in.jsonl", &code_prompts(12, |i| 6 + i % 5, 3, 0.9));
    let single = dir.join("single.jsonl");
    assert!(run_default(&input, &single, &[]).status.success());
    let merged_single = dir.join("single-merged.jsonl");
    let m = moegen(&["merge", "--input", path(&input), "--output", path(&merged_single), path(&single)]);
    assert!(m.status.success(), "{}", String::from_utf8_lossy(&m.stderr));

    let n = 3;
    let outs: Vec<PathBuf> = (0..n).map(|i| dir.join(format!("shard-{i}.jsonl"))).collect();
    let children: Vec<_> = (0..n)
        .map(|i| {
            let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/default-model");
            Command::new(env!("CARGO_BIN_EXE_moegen"))
                .args(["--device", "cpu", "generate", "--model", path(&model), "--input", path(&input), "--output", path(&outs[i]), "--quiet"])
                .args(["--shard", &format!("{i}/{n}")])
                .env("XDG_RUNTIME_DIR", std::env::temp_dir())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    let counts: Vec<usize> = outs.iter().map(|o| lines(o).len()).collect();
    assert_eq!(counts.iter().sum::<usize>(), 12, "{counts:?}");
    let merged = dir.join("merged.jsonl");
    let mut args = vec!["merge", "--input", path(&input), "--output", path(&merged)];
    args.extend(outs.iter().map(|o| path(o)));
    assert!(moegen(&args).status.success());
    assert_eq!(std::fs::read(&merged).unwrap(), std::fs::read(&merged_single).unwrap(), "shards merged differ from one process");
    // A shard missing, or given twice, is named.
    fails_with(&moegen(&["merge", "--input", path(&input), "--output", path(&merged), path(&outs[0]), path(&outs[1])]), &["have no result"]);
    fails_with(&moegen(&["merge", "--input", path(&input), "--output", path(&merged), path(&outs[0]), path(&outs[0]), path(&outs[1]), path(&outs[2])]), &["present twice"]);

    // Killed (SIGKILL) at a few points, then resumed: the same results.
    for (k, delay_ms) in [150u64, 400, 900].into_iter().enumerate() {
        let out = dir.join(format!("killed-{k}.jsonl"));
        let mut child = spawn_default(&input, &out);
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let _ = child.kill();
        let _ = child.wait();
        let o = run_default(&input, &out, &["--resume", "--max-step-tokens", "8"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let fixed = dir.join(format!("killed-{k}-merged.jsonl"));
        let m = moegen(&["merge", "--input", path(&input), "--output", path(&fixed), path(&out)]);
        assert!(m.status.success(), "kill at {delay_ms} ms: {}", String::from_utf8_lossy(&m.stderr));
        assert_eq!(std::fs::read(&fixed).unwrap(), std::fs::read(&merged_single).unwrap(), "kill at {delay_ms} ms, then --resume");
    }
}

/// Two processes that start on an adapter nobody has calibrated yet: one measures it while the
/// other waits on the lock and reads the profile it wrote, so both plan with the same kernels.
#[test]
fn processes_starting_together_calibrate_once() {
    let dir = scratch("calibrate-once");
    let cache = dir.join("cache");
    let children: Vec<_> = (0..2)
        .map(|_| {
            Command::new(env!("CARGO_BIN_EXE_moegen"))
                .args(["--device", "gpu", "plan", "--synthetic", "ci-small"])
                .env("XDG_RUNTIME_DIR", std::env::temp_dir())
                .env("XDG_CACHE_HOME", &cache)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<Output> = children.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
    for o in &outs {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let calibrated = outs.iter().filter(|o| String::from_utf8_lossy(&o.stderr).contains("calibrating")).count();
    assert_eq!(calibrated, 1, "each process calibrated");
    let kernels: Vec<String> = outs.iter().map(|o| String::from_utf8_lossy(&o.stdout).lines().find(|l| l.starts_with("kernels:")).unwrap_or("").to_string()).collect();
    assert!(!kernels[0].is_empty() && kernels[0] == kernels[1], "{kernels:?}");
    let profiles = std::fs::read_dir(cache.join("moegen/hardware")).unwrap().filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "json")).count();
    assert_eq!(profiles, 1);
}

#[test]
fn resuming_another_jobs_output_is_refused_and_leaves_it_as_it_was() {
    let dir = scratch("foreign");
    let first = write(&dir, "first.jsonl", "{\"id\": \"a\", \"prompt\": \"x\", \"max_new_tokens\": 2}\n{\"id\": \"b\", \"prompt\": \"y\", \"max_new_tokens\": 2}\n");
    let other = write(&dir, "other.jsonl", "{\"id\": \"a\", \"prompt\": \"x\", \"max_new_tokens\": 2}\n{\"id\": \"c\", \"prompt\": \"z\", \"max_new_tokens\": 2}\n");
    let out = dir.join("out.jsonl");
    assert!(run_default(&first, &out, &[]).status.success());
    let before = std::fs::read(&out).unwrap();
    let o = run_default(&other, &out, &["--resume"]);
    fails_with(&o, &["out.jsonl", "other.jsonl", "\"b\"", "another job's output"]);
    assert_eq!(std::fs::read(&out).unwrap(), before, "a refused resume changed the output");
    // The same input resumes (nothing left to do) and leaves it as it was too.
    assert!(run_default(&first, &out, &["--resume"]).status.success());
    assert_eq!(std::fs::read(&out).unwrap(), before);
}

/// Stopped while results are being written (SIGKILL: at once; SIGTERM: after the step in flight,
/// saying how to resume), then resumed: the same results as one uninterrupted run, greedy and
/// sampled lines alike. SIGKILL comes at three random points (a number of finished lines drawn
/// afresh each run, its seed printed), SIGTERM after the first line; each run is checked to have
/// been cut short.
#[cfg(unix)]
#[test]
fn a_job_stopped_mid_run_by_sigkill_or_sigterm_resumes_to_the_same_results() {
    let dir = scratch("signals");
    let total = 48;
    // Lengths from 4 to 27 new tokens, so results arrive over many steps.
    let input = write(&dir, "in.jsonl", &code_prompts(total, |i| 4 + i % 24, 4, 0.8));
    let whole = dir.join("whole.jsonl");
    assert!(run_default(&input, &whole, &[]).status.success());
    let reference = dir.join("whole-merged.jsonl");
    assert!(moegen(&["merge", "--input", path(&input), "--output", path(&reference), path(&whole)]).status.success());

    let complete_lines = |p: &Path| std::fs::read_to_string(p).map(|t| t.matches('\n').count()).unwrap_or(0);
    // MOEGEN_KILL_SEED replays a run's points.
    let seed = std::env::var("MOEGEN_KILL_SEED").ok().and_then(|s| s.parse().ok());
    let seed = seed.unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64);
    eprintln!("kill points drawn with seed {seed} (MOEGEN_KILL_SEED={seed} replays them)");
    let mut state = seed | 1;
    let mut draw = move |below: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % below as u64) as usize
    };
    let points: Vec<(&str, usize)> = (0..3).map(|_| ("KILL", 1 + draw(total / 2))).chain([("TERM", 1)]).collect();
    for (run, &(signal, after_lines)) in points.iter().enumerate() {
        let out = dir.join(format!("stopped-{run}-{signal}.jsonl"));
        let child = spawn_default(&input, &out);
        let waited = std::time::Instant::now();
        while complete_lines(&out) < after_lines && waited.elapsed() < std::time::Duration::from_secs(120) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let at_signal = complete_lines(&out);
        let sent = Command::new("kill").args(["-s", signal, &child.id().to_string()]).status().unwrap();
        assert!(sent.success(), "kill -s {signal}");
        let stopped = child.wait_with_output().unwrap();
        let written = complete_lines(&out);
        eprintln!("SIG{signal}: {at_signal} of {total} lines written when signalled, {written} at exit");
        assert!(at_signal >= after_lines && written < total, "SIG{signal}: {at_signal} lines when signalled, {written} at exit: the job was not stopped mid-run");
        assert!(!stopped.status.success(), "SIG{signal}: a stopped job exits non-zero");
        if signal == "TERM" {
            let err = String::from_utf8_lossy(&stopped.stderr);
            assert!(err.contains("--resume"), "SIGTERM: no resume hint in {err}");
            // A graceful stop leaves whole lines only.
            let text = std::fs::read_to_string(&out).unwrap();
            assert!(text.ends_with('\n') && text.lines().all(|l| serde_json::from_str::<Value>(l).is_ok()), "SIGTERM left a torn line");
        }
        let resumed = run_default(&input, &out, &["--resume", "--max-step-tokens", "8"]);
        assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
        let fixed = dir.join(format!("stopped-{run}-{signal}-merged.jsonl"));
        let m = moegen(&["merge", "--input", path(&input), "--output", path(&fixed), path(&out)]);
        assert!(m.status.success(), "SIG{signal}: {}", String::from_utf8_lossy(&m.stderr));
        assert_eq!(std::fs::read(&fixed).unwrap(), std::fs::read(&reference).unwrap(), "SIG{signal} after {written} of {total} lines, then --resume");
    }
}

/// A copy of `src` without tensor `drop`, its data repacked so the file is valid safetensors.
fn safetensors_without(src: &Path, dst: &Path, drop: &str) {
    let (header, data) = read_safetensors(src);
    let Value::Object(header) = header else { panic!("a safetensors header is an object") };
    let mut tensors: Vec<(String, Value)> = header.into_iter().filter(|(k, _)| k != "__metadata__" && k != drop).collect();
    tensors.sort_by_key(|(_, t)| t["data_offsets"][0].as_u64().unwrap());
    let (mut out, mut blob) = (serde_json::Map::new(), Vec::new());
    for (k, mut t) in tensors {
        let (s, e) = (t["data_offsets"][0].as_u64().unwrap() as usize, t["data_offsets"][1].as_u64().unwrap() as usize);
        t["data_offsets"] = serde_json::json!([blob.len(), blob.len() + e - s]);
        blob.extend_from_slice(&data[s..e]);
        out.insert(k, t);
    }
    write_safetensors(dst, &Value::Object(out), &blob);
}

/// A safetensors file's header and its data.
fn read_safetensors(src: &Path) -> (Value, Vec<u8>) {
    let bytes = std::fs::read(src).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (serde_json::from_slice(&bytes[8..8 + n]).unwrap(), bytes[8 + n..].to_vec())
}

fn write_safetensors(dst: &Path, header: &Value, data: &[u8]) {
    let mut h = serde_json::to_vec(header).unwrap();
    h.resize(h.len().next_multiple_of(8), b' ');
    let mut file = (h.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(&h);
    file.extend_from_slice(data);
    std::fs::write(dst, file).unwrap();
}

/// `src` with tensor `name`'s shape given reversed in the header (the same bytes, so the header
/// is valid; only the model's check can see it).
fn safetensors_with_shape_reversed(src: &Path, dst: &Path, name: &str) {
    let (mut header, data) = read_safetensors(src);
    header[name]["shape"].as_array_mut().unwrap().reverse();
    write_safetensors(dst, &header, &data);
}

/// A misshapen expert tensor fails generate, bench and plan at once, naming the tensor: before
/// a device is opened (the auto device's line is never printed) or the output touched.
#[test]
fn a_misshapen_tensor_fails_before_any_device_or_output() {
    let dir = scratch("misshapen-tensor");
    let src = fixture("mixtral-f32");
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::copy(src.join("config.json"), model.join("config.json")).unwrap();
    let bad = "model.layers.1.block_sparse_moe.experts.2.w2.weight";
    safetensors_with_shape_reversed(&src.join("model.safetensors"), &model.join("model.safetensors"), bad);
    let input = write(&dir, "in.jsonl", "{\"id\": 1, \"prompt_ids\": [3, 4]}\n");
    let out = dir.join("out.jsonl");
    let m = path(&model);
    for args in [
        vec!["generate", "--model", m, "--input", path(&input), "--output", path(&out), "--quiet"],
        vec!["bench", "--model", m, "--sequences", "2", "--prompt-len", "2", "--new-tokens", "2"],
        vec!["plan", "--model", m, "--sequences", "2", "--prompt-len", "2", "--new-tokens", "2"],
    ] {
        let o = moegen_with(&args, &[]);
        fails_with(&o, &[bad, "shape [96, 64], expected [64, 96]"]);
        assert!(!String::from_utf8_lossy(&o.stderr).contains("device:"), "{}: opened a device before checking the model", args[0]);
    }
    assert!(!out.exists(), "a job whose model failed its check created its output");
}

#[test]
fn a_missing_expert_tensor_leaves_the_output_untouched() {
    let dir = scratch("missing-tensor");
    let src = fixture("mixtral-f32");
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["config.json", "generation_config.json"] {
        std::fs::copy(src.join(f), model.join(f)).unwrap();
    }
    let gone = "model.layers.1.block_sparse_moe.experts.2.w2.weight";
    safetensors_without(&src.join("model.safetensors"), &model.join("model.safetensors"), gone);
    let input = write(&dir, "in.jsonl", "{\"id\": 1, \"prompt_ids\": [3, 4]}\n{\"id\": 2, \"prompt_ids\": [5]}\n");
    let out = dir.join("out.jsonl");
    let run = |extra: &[&str]| {
        let mut args = vec!["--device", "cpu", "generate", "--model", path(&model), "--input", path(&input), "--output", path(&out), "--quiet"];
        args.extend_from_slice(extra);
        moegen_with(&args, &[])
    };
    let o = run(&[]);
    fails_with(&o, &[gone, "missing"]);
    assert!(!String::from_utf8_lossy(&o.stderr).contains("--resume"), "no resume hint when nothing was written");
    assert!(!out.exists(), "a job that failed at load created its output");
    // A resumed job's earlier results stay as they were, a cut-off last line included.
    let earlier = "{\"id\":1,\"text\":\"kept\"}\n{\"id\":2,\"te";
    std::fs::write(&out, earlier).unwrap();
    fails_with(&run(&["--resume"]), &[gone]);
    assert_eq!(std::fs::read_to_string(&out).unwrap(), earlier);
}
