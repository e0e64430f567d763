//! Loading ONNX Runtime (`ort` with `load-dynamic`) and opening sessions on the configured
//! execution provider.
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::environment::Environment;
use ort::ep::ExecutionProvider as _;
use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use tracing::{info, warn};

use crate::EngineError;

/// Which execution provider runs the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecutionProvider {
    Cpu,
    /// CUDA or fail.
    Cuda,
    /// CUDA when it registers, else CPU.
    Auto,
}

impl std::str::FromStr for ExecutionProvider {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda),
            "auto" => Ok(Self::Auto),
            other => Err(format!("unknown execution provider {other:?} (cpu, cuda, auto)")),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    /// `libonnxruntime.so`; when `None`, `ORT_DYLIB_PATH` and then the manifest's library.
    pub library: Option<PathBuf>,
    pub provider: ExecutionProvider,
    /// Intra-op threads per session (0 = ONNX Runtime's choice).
    pub intra_threads: usize,
    /// Keep the KV cache in ONNX Runtime's buffers through IoBinding. Always on when CUDA runs
    /// (the cache stays on the GPU); on the CPU it exercises the same path.
    pub bind_kv: bool,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        Self { library: None, provider: ExecutionProvider::Cpu, intra_threads: 0, bind_kv: false }
    }
}

static ENVIRONMENT: OnceLock<Result<Environment, String>> = OnceLock::new();

/// Loads the ONNX Runtime library and creates the environment, once per process (later calls
/// return the first outcome).
pub fn environment(
    options: &RuntimeOptions,
    manifest_library: Option<&Path>,
) -> Result<&'static Environment, EngineError> {
    ENVIRONMENT
        .get_or_init(|| {
            let path = options
                .library
                .clone()
                .or_else(|| std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from))
                .or_else(|| manifest_library.map(Path::to_path_buf))
                .ok_or("no ONNX Runtime library: set ORT_DYLIB_PATH or run scripts/prepare-models.sh")?;
            if !path.exists() {
                return Err(format!("{} does not exist: run scripts/prepare-models.sh", path.display()));
            }
            let env = ort::init_from(&path)
                .map_err(|e| format!("{}: {e}", path.display()))?
                .with_name("millrace")
                .build()
                .map_err(|e| e.to_string())?;
            info!(library = %path.display(), "ONNX Runtime loaded");
            Ok(env)
        })
        .as_ref()
        .map_err(|e| EngineError::Runtime(e.clone()))
}

/// The provider a session actually runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActiveProvider {
    Cpu,
    Cuda,
}

impl ActiveProvider {
    /// Where a bound KV cache lives on this provider.
    pub fn kv_memory(self) -> Result<MemoryInfo<'static>, EngineError> {
        let device = match self {
            Self::Cpu => AllocationDevice::CPU,
            Self::Cuda => AllocationDevice::CUDA,
        };
        Ok(MemoryInfo::new(device, 0, AllocatorType::Device, MemoryType::Default)?)
    }
}

/// Opens a session for `model` on the configured provider, saying which one runs and why.
pub fn open_session(
    env: &Environment,
    model: &Path,
    options: &RuntimeOptions,
) -> Result<(Session, ActiveProvider), EngineError> {
    let mut builder = Session::builder(env)?.with_optimization_level(GraphOptimizationLevel::Level3)?;
    if options.intra_threads > 0 {
        builder = builder.with_intra_threads(options.intra_threads)?;
    }
    let (active, provider) = match options.provider {
        ExecutionProvider::Cpu => (ActiveProvider::Cpu, "cpu (configured)"),
        ExecutionProvider::Cuda | ExecutionProvider::Auto => match ort::ep::CUDA::default().register(&mut builder) {
            Ok(()) => (ActiveProvider::Cuda, "cuda"),
            Err(e) if options.provider == ExecutionProvider::Cuda => {
                return Err(EngineError::Runtime(format!("CUDA execution provider did not register: {e}")));
            }
            Err(e) => {
                warn!(error = %e, "CUDA execution provider did not register; falling back to CPU");
                (ActiveProvider::Cpu, "cpu (auto: CUDA unavailable)")
            }
        },
    };
    let session =
        builder.commit_from_file(model).map_err(|e| EngineError::Model(format!("{}: {e}", model.display())))?;
    info!(model = %model.display(), provider, "session ready");
    Ok((session, active))
}
