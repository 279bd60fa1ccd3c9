//! The sandbox: one wasmtime engine per process, compiled modules cached by sha256, and a fresh
//! store per call with limits on fuel, memory, tables, wall time and output size.
//!
//! Why these settings: regions converge only if every region reaches the same outcome for the
//! same input, so the engine is made deterministic (NaNs canonicalised, relaxed SIMD
//! deterministic, no threads (built without the threads proposal), a fixed wasm stack) and every limit that decides an outcome is
//! deterministic too: fuel counts instructions, and memory, table and output limits come from the
//! deployment's shared configuration. Wall time is the exception: the epoch deadline sits far above
//! what the fuel allows and only guards against a stuck host, so hitting it is transient
//! ([`CallError::is_transient`]) and the caller tries again later rather than record it.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::Duration;

use wasmtime::{
    Caller, Config, Engine, ExternType, InstanceAllocationStrategy, InstancePre, Linker, Module,
    PoolingAllocationConfig, Store, StoreLimits, StoreLimitsBuilder, Trap, ValType,
};

use super::abi::{self, OutputError};
use crate::config::ResolverLimits;
use crate::record::resolution::Outcome;

/// How often the epoch advances: the resolution of the wall-time limit.
const EPOCH_TICK: Duration = Duration::from_millis(10);
/// The native stack a call may use. Part of the engine's fingerprint: the same build with the same
/// value overflows at the same depth everywhere.
const MAX_WASM_STACK: usize = 512 * 1024;
/// Bytes of each pooled memory kept mapped between calls (a Rust guest's stack and heap start).
/// A call may log this many lines of at most [`LOG_LINE_BYTES`]; the rest is dropped.
const LOG_LINES_PER_CALL: u32 = 16;
const LOG_LINE_BYTES: usize = 1024;

/// Why a module was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ModuleError {
    #[error("not a WebAssembly module or WAT text: {0}")]
    NotWasm(String),
    #[error("the module imports {0}; a resolver may import only `locus.log(i32, i32)`")]
    ForbiddenImport(String),
    #[error("the module must export {0}")]
    MissingExport(&'static str),
    #[error("the module's memory is not allowed: {0}")]
    Memory(String),
    #[error("the trial call failed: {0}")]
    TrialCall(CallError),
}

/// Why a call gave no outcome.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CallError {
    #[error("ran out of fuel ({0} units)")]
    OutOfFuel(u64),
    #[error("trapped: {0}")]
    Trap(String),
    #[error("returned {len} bytes of output, over the limit of {limit}")]
    OutputTooLarge { len: u64, limit: usize },
    #[error("returned output outside its memory")]
    OutputOutOfBounds,
    #[error("returned bad output: {0}")]
    Output(#[from] OutputError),
    #[error("interrupted at the wall-time limit")]
    WallTime,
    #[error("no sandbox slot was free: {0}")]
    Busy(String),
}

impl CallError {
    /// A failure that says nothing about the module and input (the host was slow or busy): the
    /// caller keeps the previous view and tries again, never records it as the outcome.
    pub fn is_transient(&self) -> bool {
        matches!(self, CallError::WallTime | CallError::Busy(_))
    }

    /// A short name for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            CallError::OutOfFuel(_) => "fuel",
            CallError::Trap(_) => "trap",
            CallError::OutputTooLarge { .. } => "output_size",
            CallError::OutputOutOfBounds | CallError::Output(_) => "bad_output",
            CallError::WallTime => "wall_time",
            CallError::Busy(_) => "busy",
        }
    }
}

/// What each call's store holds.
struct CallState {
    limits: StoreLimits,
    log_lines: u32,
}

/// A module ready to instantiate.
#[derive(Clone)]
pub struct Compiled {
    pre: InstancePre<CallState>,
}

pub struct Sandbox {
    engine: Engine,
    linker: Linker<CallState>,
    limits: ResolverLimits,
    modules: Mutex<HashMap<String, Compiled>>,
    fingerprint: String,
}

impl Sandbox {
    pub fn new(limits: &ResolverLimits) -> anyhow::Result<Sandbox> {
        let mut pool = PoolingAllocationConfig::new();
        pool.total_core_instances(limits.concurrent_calls)
            .total_memories(limits.concurrent_calls)
            .total_tables(limits.concurrent_calls)
            .max_memory_size(limits.memory_bytes)
            .table_elements(limits.table_elements)
            // Measured (`locus bench resolvers`): returning a slot's memory to the kernel after
            // each call beats zeroing it in place, and zeroing a small table beats remapping it.
            .linear_memory_keep_resident(0)
            .table_keep_resident(64 * 1024);
        let mut config = Config::new();
        config
            .consume_fuel(true)
            .epoch_interruption(true)
            .cranelift_nan_canonicalization(true)
            .relaxed_simd_deterministic(true)
            .max_wasm_stack(MAX_WASM_STACK)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config).map_err(|e| anyhow::anyhow!("wasmtime engine: {e:#}"))?;
        let mut linker = Linker::new(&engine);
        linker
            .func_wrap("locus", "log", log)
            .map_err(|e| anyhow::anyhow!("wasmtime linker: {e:#}"))?;
        let fingerprint = fingerprint(&engine, limits);
        start_epoch_ticker(&engine);
        Ok(Sandbox {
            engine,
            linker,
            limits: limits.clone(),
            modules: Mutex::new(HashMap::new()),
            fingerprint,
        })
    }

    /// Names this engine's build and every setting that can change an outcome. Regions whose
    /// fingerprints differ may resolve the same conflict differently.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    pub fn limits(&self) -> &ResolverLimits {
        &self.limits
    }

    /// Turn an upload (binary or WAT text) into module bytes, compile them and check the ABI's
    /// imports and exports. Does not run anything.
    pub fn compile(&self, upload: &[u8]) -> Result<(Vec<u8>, Compiled), ModuleError> {
        let bytes = if upload.starts_with(b"\0asm") {
            upload.to_vec()
        } else {
            let text = std::str::from_utf8(upload).map_err(|_| {
                ModuleError::NotWasm(
                    "neither a binary module (no \\0asm header) nor UTF-8 WAT text".into(),
                )
            })?;
            wat::parse_str(text).map_err(|e| ModuleError::NotWasm(e.to_string()))?
        };
        let module = Module::new(&self.engine, &bytes)
            .map_err(|e| ModuleError::NotWasm(format!("{e:#}")))?;
        self.check_shape(&module)?;
        let pre = self
            .linker
            .instantiate_pre(&module)
            .map_err(|e| ModuleError::NotWasm(format!("{e:#}")))?;
        Ok((bytes, Compiled { pre }))
    }

    fn check_shape(&self, module: &Module) -> Result<(), ModuleError> {
        for import in module.imports() {
            let allowed = import.module() == "locus"
                && import.name() == "log"
                && matches!(import.ty(), ExternType::Func(f) if signature(&f) == (vec!["i32", "i32"], vec![]));
            if !allowed {
                return Err(ModuleError::ForbiddenImport(format!(
                    "`{}.{}`",
                    import.module(),
                    import.name()
                )));
            }
        }
        let export = |name| module.exports().find(|e| e.name() == name).map(|e| e.ty());
        match export("memory") {
            Some(ExternType::Memory(memory)) => {
                if memory.is_64() || memory.is_shared() {
                    return Err(ModuleError::Memory(
                        "only a 32-bit, unshared memory is allowed".into(),
                    ));
                }
                let minimum = memory.minimum().saturating_mul(65_536);
                if minimum > self.limits.memory_bytes as u64 {
                    return Err(ModuleError::Memory(format!(
                        "it starts at {minimum} bytes, over the limit of {}",
                        self.limits.memory_bytes
                    )));
                }
            }
            _ => return Err(ModuleError::MissingExport("a memory named `memory`")),
        }
        match export("locus_alloc") {
            Some(ExternType::Func(f)) if signature(&f) == (vec!["i32"], vec!["i32"]) => {}
            _ => return Err(ModuleError::MissingExport("`locus_alloc(len: i32) -> i32`")),
        }
        match export("locus_resolve") {
            Some(ExternType::Func(f)) if signature(&f) == (vec!["i32", "i32"], vec!["i64"]) => {}
            _ => {
                return Err(ModuleError::MissingExport(
                    "`locus_resolve(ptr: i32, len: i32) -> i64`",
                ))
            }
        }
        Ok(())
    }

    /// The compiled module with this sha256, if this process has it.
    pub fn cached(&self, sha256: &str) -> Option<Compiled> {
        self.modules
            .lock()
            .expect("module cache lock")
            .get(sha256)
            .cloned()
    }

    pub fn remember(&self, sha256: &str, compiled: Compiled) {
        self.modules
            .lock()
            .expect("module cache lock")
            .insert(sha256.to_owned(), compiled);
    }

    /// Run one resolution: a fresh store, the module instantiated from the pool, the input written
    /// into its memory, `locus_resolve` called, its output checked. Blocks the calling thread for
    /// at most the fuel's worth of work.
    pub fn call(&self, compiled: &Compiled, input: &[u8]) -> Result<Outcome, CallError> {
        let limits = StoreLimitsBuilder::new()
            .memory_size(self.limits.memory_bytes)
            .table_elements(self.limits.table_elements)
            .instances(1)
            .memories(1)
            .tables(1)
            .build();
        let mut store = Store::new(
            &self.engine,
            CallState {
                limits,
                log_lines: 0,
            },
        );
        store.limiter(|state| &mut state.limits);
        store
            .set_fuel(self.limits.fuel)
            .map_err(|e| CallError::Busy(e.to_string()))?;
        store.set_epoch_deadline((self.limits.wall_time_ms / EPOCH_TICK.as_millis() as u64).max(1));
        // Instantiation can fail only for want of a pool slot (the module's shape was checked at
        // upload), or when its start code traps.
        let instance = compiled
            .pre
            .instantiate(&mut store)
            .map_err(|e| self.classify(e, true))?;
        let memory = instance
            .get_memory(&mut store, "memory")
            .ok_or_else(|| CallError::Trap("no memory export".into()))?;
        let alloc = instance
            .get_typed_func::<i32, i32>(&mut store, "locus_alloc")
            .map_err(|e| CallError::Trap(e.to_string()))?;
        let resolve = instance
            .get_typed_func::<(i32, i32), i64>(&mut store, "locus_resolve")
            .map_err(|e| CallError::Trap(e.to_string()))?;
        let len = i32::try_from(input.len())
            .map_err(|_| CallError::Trap("input larger than 2 GiB".into()))?;
        let ptr = alloc
            .call(&mut store, len)
            .map_err(|e| self.classify(e, false))?;
        memory
            .write(&mut store, ptr as u32 as usize, input)
            .map_err(|_| CallError::Trap("locus_alloc returned memory out of bounds".into()))?;
        let packed = resolve
            .call(&mut store, (ptr, len))
            .map_err(|e| self.classify(e, false))? as u64;
        let (out_ptr, out_len) = ((packed >> 32) as usize, packed & 0xffff_ffff);
        if out_len > self.limits.output_bytes as u64 {
            return Err(CallError::OutputTooLarge {
                len: out_len,
                limit: self.limits.output_bytes,
            });
        }
        let data = memory.data(&store);
        let output = data
            .get(out_ptr..out_ptr + out_len as usize)
            .ok_or(CallError::OutputOutOfBounds)?;
        Ok(abi::decode_output(output)?)
    }

    fn classify(&self, error: wasmtime::Error, instantiating: bool) -> CallError {
        match error.downcast_ref::<Trap>() {
            Some(Trap::OutOfFuel) => CallError::OutOfFuel(self.limits.fuel),
            Some(Trap::Interrupt) => CallError::WallTime,
            Some(trap) => CallError::Trap(trap.to_string()),
            None if instantiating => CallError::Busy(format!("{error:#}")),
            None => CallError::Trap(format!("{error:#}")),
        }
    }
}

fn signature(f: &wasmtime::FuncType) -> (Vec<&'static str>, Vec<&'static str>) {
    let name = |t: ValType| match t {
        ValType::I32 => "i32",
        ValType::I64 => "i64",
        _ => "other",
    };
    (
        f.params().map(name).collect(),
        f.results().map(name).collect(),
    )
}

/// `locus.log(ptr, len)`: a resolver's debug line, bounded in count and size.
fn log(mut caller: Caller<'_, CallState>, ptr: i32, len: i32) {
    if caller.data().log_lines >= LOG_LINES_PER_CALL {
        return;
    }
    caller.data_mut().log_lines += 1;
    let Some(memory) = caller.get_export("memory").and_then(|e| e.into_memory()) else {
        return;
    };
    let start = ptr as u32 as usize;
    let len = (len as u32 as usize).min(LOG_LINE_BYTES);
    if let Some(bytes) = memory.data(&caller).get(start..start.saturating_add(len)) {
        tracing::info!(target: "locus::resolver", "{}", String::from_utf8_lossy(bytes));
    }
}

fn fingerprint(engine: &Engine, limits: &ResolverLimits) -> String {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut hasher);
    MAX_WASM_STACK.hash(&mut hasher);
    (
        limits.fuel,
        limits.memory_bytes,
        limits.table_elements,
        limits.output_bytes,
    )
        .hash(&mut hasher);
    format!("wasmtime-{}-{:016x}", wasmtime_version(), hasher.finish())
}

fn wasmtime_version() -> &'static str {
    "48"
}

/// Advance the engine's epoch every tick, for as long as the engine lives.
fn start_epoch_ticker(engine: &Engine) {
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("locus-epoch".into())
        .spawn(move || {
            while let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(EPOCH_TICK);
            }
        })
        .expect("spawn the epoch thread");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resolve::trial_input;

    fn sandbox(limits: ResolverLimits) -> Sandbox {
        Sandbox::new(&limits).expect("engine")
    }

    fn small_limits() -> ResolverLimits {
        ResolverLimits {
            fuel: 2_000_000,
            memory_bytes: 4 * 1024 * 1024,
            concurrent_calls: 2,
            ..ResolverLimits::default()
        }
    }

    /// A module with the ABI's exports whose `locus_resolve` body is `body`, with `data` at 16.
    fn module(data: &str, body: &str) -> String {
        format!(
            r#"(module
                 (memory (export "memory") 1)
                 (data (i32.const 16) "{data}")
                 (func (export "locus_alloc") (param i32) (result i32) (i32.const 1024))
                 (func $recurse (param i32) (result i32)
                   (i32.add (call $recurse (i32.add (local.get 0) (i32.const 1))) (i32.const 1)))
                 (func (export "locus_resolve") (param $ptr i32) (param $len i32) (result i64)
                   {body}))"#
        )
    }

    fn run(sandbox: &Sandbox, wat: &str) -> Result<Outcome, CallError> {
        let (_, compiled) = sandbox.compile(wat.as_bytes()).expect("compiles");
        sandbox.call(&compiled, &trial_input())
    }

    /// `(out_ptr << 32) | out_len` for output at 16.
    fn output(len: u64) -> String {
        format!("(i64.const {})", (16u64 << 32) | len)
    }

    #[test]
    fn a_well_behaved_module_resolves() {
        let sandbox = sandbox(small_limits());
        let data = r#"{\"value\":42}"#;
        assert_eq!(
            run(&sandbox, &module(data, &output(12))),
            Ok(Outcome::value(serde_json::json!(42)))
        );
    }

    #[test]
    fn hostile_modules_end_within_their_limits() {
        let sandbox = sandbox(small_limits());
        let cases: [(&str, String, &str); 7] = [
            (
                "infinite loop",
                "(loop $l (br $l)) (unreachable)".into(),
                "fuel",
            ),
            (
                "memory.grow loop",
                "(loop $l (drop (memory.grow (i32.const 16))) (br $l)) (unreachable)".into(),
                "fuel",
            ),
            (
                "deep recursion",
                "(drop (call $recurse (i32.const 0))) (i64.const 0)".into(),
                "trap",
            ),
            ("a trap", "(unreachable)".into(), "trap"),
            ("100 MB output", output(100 * 1024 * 1024), "output_size"),
            (
                "output past its memory",
                "(i64.const 0x0000fff000000400)".into(),
                "bad_output",
            ),
            ("invalid UTF-8", output(4), "bad_output"),
        ];
        for (what, body, kind) in cases {
            let started = std::time::Instant::now();
            let result = run(&sandbox, &module(r#"\ff\fe\fd\fc"#, &body));
            let error = result.expect_err(what);
            assert_eq!(error.kind(), kind, "{what}: {error}");
            assert!(!error.is_transient(), "{what}: deterministic");
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{what} took {:?}",
                started.elapsed()
            );
        }
        let data = r#"{\"values\":1}"#;
        assert_eq!(
            run(&sandbox, &module(data, &output(12))),
            Err(CallError::Output(OutputError::NotAnOutcome))
        );
    }

    #[test]
    fn running_out_of_fuel_is_deterministic_and_wall_time_is_transient() {
        let looping = module("", "(loop $l (br $l)) (unreachable)");
        let sandbox = sandbox(small_limits());
        for _ in 0..3 {
            assert_eq!(
                run(&sandbox, &looping),
                Err(CallError::OutOfFuel(2_000_000))
            );
        }
        let slow = sandbox_with_fuel_beyond_wall_time();
        let error = run(&slow, &looping).unwrap_err();
        assert_eq!(error, CallError::WallTime);
        assert!(error.is_transient());
    }

    fn sandbox_with_fuel_beyond_wall_time() -> Sandbox {
        sandbox(ResolverLimits {
            fuel: u64::MAX / 2,
            wall_time_ms: 50,
            ..small_limits()
        })
    }

    #[test]
    fn uploads_are_checked_against_the_abi() {
        let sandbox = sandbox(small_limits());
        let refused = |wat: &str| sandbox.compile(wat.as_bytes()).err().expect("refused");
        assert!(matches!(
            refused("not wasm at all"),
            ModuleError::NotWasm(_)
        ));
        assert!(matches!(
            sandbox.compile(b"\0asm\x01\0\0\0\xff").err().unwrap(),
            ModuleError::NotWasm(_)
        ));
        let wasi = r#"(module
            (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
            (memory (export "memory") 1)
            (func (export "locus_alloc") (param i32) (result i32) (i32.const 0))
            (func (export "locus_resolve") (param i32 i32) (result i64) (i64.const 0)))"#;
        assert!(matches!(refused(wasi), ModuleError::ForbiddenImport(i) if i.contains("fd_write")));
        let no_resolve = r#"(module (memory (export "memory") 1)
            (func (export "locus_alloc") (param i32) (result i32) (i32.const 0)))"#;
        assert!(
            matches!(refused(no_resolve), ModuleError::MissingExport(e) if e.contains("locus_resolve"))
        );
        let wrong_type = r#"(module (memory (export "memory") 1)
            (func (export "locus_alloc") (param i32) (result i32) (i32.const 0))
            (func (export "locus_resolve") (param i32 i32) (result i32) (i32.const 0)))"#;
        assert!(matches!(refused(wrong_type), ModuleError::MissingExport(_)));
        let huge_memory = r#"(module (memory (export "memory") 1000)
            (func (export "locus_alloc") (param i32) (result i32) (i32.const 0))
            (func (export "locus_resolve") (param i32 i32) (result i64) (i64.const 0)))"#;
        let error = refused(huge_memory);
        assert!(error.to_string().contains("memory"), "{error}");
        let logging = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/resolvers/wat/hide-conflicts.wat"
        ))
        .unwrap();
        assert_eq!(run(&sandbox, &logging), Ok(Outcome::deleted()));
    }

    #[test]
    fn the_fingerprint_names_the_limits_that_decide_outcomes() {
        let a = sandbox(small_limits());
        let b = sandbox(small_limits());
        assert_eq!(a.fingerprint(), b.fingerprint());
        let c = sandbox(ResolverLimits {
            fuel: 3_000_000,
            ..small_limits()
        });
        assert_ne!(a.fingerprint(), c.fingerprint());
        let d = sandbox(ResolverLimits {
            wall_time_ms: 60_000,
            ..small_limits()
        });
        assert_eq!(
            a.fingerprint(),
            d.fingerprint(),
            "wall time decides nothing"
        );
    }
}
