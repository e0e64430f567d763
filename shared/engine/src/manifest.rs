//! The model manifest that `scripts/prepare-models.sh` writes (`models/prepared/manifest.json`):
//! per model its kind, files, tokenizer, chat template, special tokens, shape facts and a
//! content-hash version; and the ONNX Runtime library to load. Its `schema_version` says how to
//! read it: a version this engine does not know, or none, is refused with the fix.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tokenizers::Tokenizer;

use crate::runtime::{self, ActiveProvider, RuntimeOptions};
use crate::{ChatTemplate, Classifier, DecoderSpec, Embedder, EngineError, Generator};

/// The manifest `schema_version`s this engine reads. The preparation writes
/// `MANIFEST_SCHEMA_VERSION` (models/millrace_models/manifest.py): change both together.
pub const SUPPORTED_SCHEMA_VERSIONS: &[u64] = &[1];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    Generate,
    Embed,
    Classify,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ModelEntry {
    pub name: String,
    pub kind: ModelKind,
    /// Content hash of the model files.
    pub version: String,
    /// Paths relative to the manifest's folder.
    pub model: PathBuf,
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
    #[serde(default)]
    pub chat_template: Option<String>,
    #[serde(default)]
    pub special_tokens: BTreeMap<String, u32>,
    #[serde(default)]
    pub context_length: usize,
    #[serde(default)]
    pub num_layers: usize,
    #[serde(default)]
    pub num_kv_heads: usize,
    #[serde(default)]
    pub head_dim: usize,
    #[serde(default)]
    pub vocab_size: usize,
    /// Tokens that end generation (EOS, end of turn …); defaults to the `eos` special token.
    #[serde(default)]
    pub stop_token_ids: Vec<u32>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct OnnxRuntimeEntry {
    pub version: String,
    pub library: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    /// One of [`SUPPORTED_SCHEMA_VERSIONS`] (checked before anything else is read).
    pub schema_version: u64,
    pub onnxruntime: Option<OnnxRuntimeEntry>,
    pub models: Vec<ModelEntry>,
    #[serde(skip)]
    dir: PathBuf,
}

impl Manifest {
    /// Reads `<dir>/manifest.json`.
    pub fn load(dir: &Path) -> Result<Self, EngineError> {
        let path = dir.join("manifest.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| EngineError::Manifest(format!("{}: {e} (run scripts/prepare-models.sh)", path.display())))?;
        let mut manifest = Self::parse(&path, &text)?;
        manifest.dir = dir.to_path_buf();
        Ok(manifest)
    }

    /// Parses a manifest's text (`path` names it in errors); its schema version is checked
    /// first, so that a manifest of another schema is refused as such, not for a field.
    fn parse(path: &Path, text: &str) -> Result<Self, EngineError> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| EngineError::Manifest(format!("{}: {e}", path.display())))?;
        check_schema_version(path, &value)?;
        serde_json::from_value(value).map_err(|e| EngineError::Manifest(format!("{}: {e}", path.display())))
    }

    /// The models of one kind, in manifest order.
    pub fn models_of(&self, kind: ModelKind) -> impl Iterator<Item = &ModelEntry> {
        self.models.iter().filter(move |m| m.kind == kind)
    }

    pub fn model(&self, name: &str) -> Result<&ModelEntry, EngineError> {
        self.models.iter().find(|m| m.name == name).ok_or_else(|| {
            let known: Vec<_> = self.models.iter().map(|m| m.name.as_str()).collect();
            EngineError::Manifest(format!("no model {name:?} in the manifest (has {known:?})"))
        })
    }

    pub fn path(&self, relative: &Path) -> PathBuf {
        self.dir.join(relative)
    }

    fn session(
        &self,
        entry: &ModelEntry,
        kind: ModelKind,
        options: &RuntimeOptions,
    ) -> Result<(ort::session::Session, ActiveProvider), EngineError> {
        if entry.kind != kind {
            return Err(EngineError::Manifest(format!(
                "model {:?} is a {:?} model, not {kind:?}",
                entry.name, entry.kind
            )));
        }
        let library = self.onnxruntime.as_ref().map(|o| self.path(&o.library));
        let env = runtime::environment(options, library.as_deref())?;
        runtime::open_session(env, &self.path(&entry.model), options)
    }

    fn tokenizer(&self, entry: &ModelEntry) -> Result<Tokenizer, EngineError> {
        let path = entry
            .tokenizer
            .as_ref()
            .ok_or_else(|| EngineError::Manifest(format!("model {:?} has no tokenizer", entry.name)))?;
        Tokenizer::from_file(self.path(path)).map_err(|e| EngineError::Tokenizer(format!("{}: {e}", path.display())))
    }

    /// The tokenizer of model `name` (e.g. to count a prompt's tokens without loading the model).
    pub fn model_tokenizer(&self, name: &str) -> Result<Tokenizer, EngineError> {
        self.tokenizer(self.model(name)?)
    }

    pub fn generator(&self, name: &str, options: &RuntimeOptions) -> Result<Generator, EngineError> {
        let entry = self.model(name)?;
        let (session, active) = self.session(entry, ModelKind::Generate, options)?;
        let generator = Generator::new(session, self.tokenizer(entry)?, entry.decoder_spec()?);
        Ok(if active == ActiveProvider::Cuda || options.bind_kv {
            generator.with_bound_kv(active.kv_memory()?)
        } else {
            generator
        })
    }

    pub fn embedder(&self, name: &str, options: &RuntimeOptions) -> Result<Embedder, EngineError> {
        let entry = self.model(name)?;
        Ok(Embedder::new(self.session(entry, ModelKind::Embed, options)?.0, self.tokenizer(entry)?))
    }

    pub fn classifier(&self, name: &str, options: &RuntimeOptions) -> Result<Classifier, EngineError> {
        let entry = self.model(name)?;
        Ok(Classifier::new(self.session(entry, ModelKind::Classify, options)?.0))
    }

    pub fn chat_template(&self, name: &str) -> Result<ChatTemplate, EngineError> {
        let entry = self.model(name)?;
        let source = entry
            .chat_template
            .as_deref()
            .ok_or_else(|| EngineError::Manifest(format!("model {name:?} has no chat template")))?;
        ChatTemplate::new(source)
    }
}

/// Refuses a manifest whose `schema_version` is missing or not in [`SUPPORTED_SCHEMA_VERSIONS`],
/// naming the file, what it found, what this engine reads and the fix.
fn check_schema_version(path: &Path, manifest: &serde_json::Value) -> Result<u64, EngineError> {
    let supported = SUPPORTED_SCHEMA_VERSIONS.iter().map(u64::to_string).collect::<Vec<_>>().join(", ");
    let found = match manifest.get("schema_version") {
        Some(version) => match version.as_u64() {
            Some(v) if SUPPORTED_SCHEMA_VERSIONS.contains(&v) => return Ok(v),
            _ => format!("schema_version {version}"),
        },
        None => "no schema_version".to_owned(),
    };
    Err(EngineError::Manifest(format!(
        "{} has {found}; this engine reads schema_version {supported}. Re-run scripts/prepare-models.sh \
         (it prepares the models again for this checkout and rewrites the manifest)",
        path.display()
    )))
}

impl ModelEntry {
    pub fn decoder_spec(&self) -> Result<DecoderSpec, EngineError> {
        let token = |key: &str| {
            self.special_tokens
                .get(key)
                .copied()
                .ok_or_else(|| EngineError::Manifest(format!("model {:?} has no `{key}` special token", self.name)))
        };
        if self.num_layers == 0 || self.num_kv_heads == 0 || self.head_dim == 0 || self.vocab_size == 0 {
            return Err(EngineError::Manifest(format!("model {:?} lacks its KV-cache shape", self.name)));
        }
        let eos_token_ids =
            if self.stop_token_ids.is_empty() { vec![token("eos")?] } else { self.stop_token_ids.clone() };
        Ok(DecoderSpec {
            num_layers: self.num_layers,
            num_kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
            vocab_size: self.vocab_size,
            context_length: self.context_length.max(1),
            eos_token_ids,
            pad_token_id: token("pad").or_else(|_| token("eos"))?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFEST: &str = r#"{
        "onnxruntime": {"version": "1.31.1", "library": "onnxruntime/libonnxruntime.so.1.31.1"},
        "models": [{"name": "tiny-llama", "kind": "generate", "version": "abc", "model": "tiny-llama/model.onnx"}]
    }"#;

    fn with_schema(schema: &str) -> String {
        MANIFEST.replacen('{', &format!("{{\n        {schema}"), 1)
    }

    fn refusal(text: &str) -> String {
        match Manifest::parse(Path::new("models/prepared/manifest.json"), text) {
            Ok(m) => panic!("accepted schema_version {}", m.schema_version),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_known_schema_version_is_read() {
        for &version in SUPPORTED_SCHEMA_VERSIONS {
            let text = with_schema(&format!(r#""schema_version": {version},"#));
            let manifest = Manifest::parse(Path::new("manifest.json"), &text).expect("supported version");
            assert_eq!(manifest.schema_version, version);
            assert_eq!(manifest.model("tiny-llama").expect("model").kind, ModelKind::Generate);
        }
    }

    #[test]
    fn an_unknown_schema_version_is_refused_naming_file_versions_and_fix() {
        for found in ["2", "0", "-1", "1.5", r#""1""#, "null"] {
            let error = refusal(&with_schema(&format!(r#""schema_version": {found},"#)));
            assert!(error.contains("models/prepared/manifest.json"), "{error}");
            assert!(error.contains(&format!("has schema_version {found};")), "{error}");
            assert!(error.contains("this engine reads schema_version 1."), "{error}");
            assert!(error.contains("Re-run scripts/prepare-models.sh"), "{error}");
        }
    }

    #[test]
    fn a_manifest_without_schema_version_is_refused() {
        let error = refusal(MANIFEST);
        assert!(error.contains("models/prepared/manifest.json has no schema_version;"), "{error}");
        assert!(error.contains("this engine reads schema_version 1."), "{error}");
        assert!(error.contains("Re-run scripts/prepare-models.sh"), "{error}");
    }

    #[test]
    fn an_unknown_schema_is_refused_before_its_fields_are_read() {
        // A future schema may drop or rename fields: the error must be about the version.
        let error = refusal(r#"{"schema_version": 2, "generators": []}"#);
        assert!(error.contains("has schema_version 2;"), "{error}");
        assert!(!error.contains("missing field"), "{error}");
    }

    #[test]
    fn load_names_the_file_in_the_error() {
        let dir = std::env::temp_dir().join(format!("millrace-manifest-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::write(dir.join("manifest.json"), with_schema(r#""schema_version": 99,"#)).expect("write");
        let error = Manifest::load(&dir).expect_err("schema 99").to_string();
        std::fs::remove_dir_all(&dir).ok();
        assert!(error.contains(&format!("{} has schema_version 99;", dir.join("manifest.json").display())), "{error}");
        let loaded = Manifest::load(Path::new("/nonexistent/millrace")).expect_err("no manifest").to_string();
        assert!(loaded.contains("run scripts/prepare-models.sh"), "{loaded}");
    }
}
