//! Reading safetensors (single or sharded, memory-mapped) into tensors by name, and writing them
//! atomically with the `{"format": "pt"}` metadata transformers expects.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use tch::{Kind, Tensor};

use crate::error::{ModelError, Result};

/// One or more memory-mapped safetensors files, looked up by tensor name.
#[derive(Debug)]
pub struct SafetensorsFiles {
    files: Vec<(PathBuf, Mmap)>,
    /// Tensor name → index into `files`.
    index: HashMap<String, usize>,
}

impl SafetensorsFiles {
    /// Opens the weights of a model dir: `model.safetensors`, or the shards listed by
    /// `model.safetensors.index.json`.
    pub fn open_model_dir(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        if single.exists() {
            return Self::open(&[single]);
        }
        let index_path = dir.join("model.safetensors.index.json");
        if !index_path.exists() {
            return Err(ModelError::NotFound {
                path: single,
                hint: " (nor model.safetensors.index.json for sharded weights)".to_string(),
            });
        }
        #[derive(serde::Deserialize)]
        struct Index {
            weight_map: BTreeMap<String, String>,
        }
        let text =
            std::fs::read_to_string(&index_path).map_err(|e| ModelError::io(&index_path, e))?;
        let index: Index = serde_json::from_str(&text).map_err(|source| ModelError::Json {
            path: index_path.clone(),
            source,
        })?;
        let mut shards: Vec<PathBuf> = Vec::new();
        for file in index.weight_map.values() {
            if file.contains('/') || file.contains("..") {
                return Err(ModelError::invalid(
                    &index_path,
                    format!("shard name `{file}` is not a plain file name"),
                ));
            }
            let path = dir.join(file);
            if !shards.contains(&path) {
                shards.push(path);
            }
        }
        Self::open(&shards)
    }

    /// Maps and indexes the given files; a name present in two files is an error.
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let mmap = map_file(path)?;
            let st = SafeTensors::deserialize(&mmap).map_err(|e| ModelError::Safetensors {
                path: path.clone(),
                problem: e.to_string(),
            })?;
            for name in st.names() {
                if index.insert(name.to_string(), i).is_some() {
                    return Err(ModelError::Safetensors {
                        path: path.clone(),
                        problem: format!("tensor `{name}` appears in more than one shard"),
                    });
                }
            }
            files.push((path.clone(), mmap));
        }
        Ok(SafetensorsFiles { files, index })
    }

    /// The path to name in errors about the whole set (the first file).
    pub fn display_path(&self) -> PathBuf {
        self.files
            .first()
            .map(|(p, _)| p.clone())
            .unwrap_or_default()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// The tensor `name`, checked against `expected` shape, as a CPU tensor of its stored dtype.
    pub fn tensor(&self, name: &str, expected: Option<&[i64]>) -> Result<Tensor> {
        let Some(&i) = self.index.get(name) else {
            return Err(ModelError::MissingTensor {
                path: self.display_path(),
                name: name.to_string(),
            });
        };
        let (path, mmap) = &self.files[i];
        let st = SafeTensors::deserialize(mmap).map_err(|e| ModelError::Safetensors {
            path: path.clone(),
            problem: e.to_string(),
        })?;
        let view = st.tensor(name).map_err(|e| ModelError::Safetensors {
            path: path.clone(),
            problem: e.to_string(),
        })?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        if let Some(expected) = expected
            && shape != expected
        {
            return Err(ModelError::ShapeMismatch {
                path: path.clone(),
                name: name.to_string(),
                expected: expected.to_vec(),
                found: shape,
            });
        }
        let kind = match view.dtype() {
            Dtype::F32 => Kind::Float,
            Dtype::F16 => Kind::Half,
            Dtype::BF16 => Kind::BFloat16,
            Dtype::F64 => Kind::Double,
            Dtype::I64 => Kind::Int64,
            other => {
                return Err(ModelError::UnsupportedDtype {
                    path: path.clone(),
                    name: name.to_string(),
                    dtype: format!("{other:?}"),
                });
            }
        };
        Ok(Tensor::f_from_data_size(view.data(), &shape, kind)?)
    }

    /// The metadata map of the first file (e.g. herd's own keys in an adapter).
    pub fn metadata(&self) -> Result<HashMap<String, String>> {
        let Some((path, mmap)) = self.files.first() else {
            return Ok(HashMap::new());
        };
        let (_, meta) = SafeTensors::read_metadata(mmap).map_err(|e| ModelError::Safetensors {
            path: path.clone(),
            problem: e.to_string(),
        })?;
        Ok(meta.metadata().clone().unwrap_or_default())
    }
}

#[allow(unsafe_code)]
fn map_file(path: &Path) -> Result<Mmap> {
    let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
    // SAFETY: the map is read-only and model files are not modified while herd reads them;
    // a file truncated underneath us would be a user error that surfaces as SIGBUS, the
    // accepted trade-off of every mmap-based model loader (safetensors, candle, transformers).
    unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))
}

/// A tensor serialised for writing: its dtype, shape and little-endian bytes.
struct OwnedView {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl safetensors::View for &OwnedView {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn owned_view(name: &str, tensor: &Tensor) -> Result<OwnedView> {
    let tensor = tensor.f_to_device(tch::Device::Cpu)?.f_contiguous()?;
    let dtype = match tensor.kind() {
        Kind::Float => Dtype::F32,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Double => Dtype::F64,
        Kind::Int64 => Dtype::I64,
        other => {
            return Err(ModelError::Argument(format!(
                "cannot write tensor `{name}` of kind {other:?}"
            )));
        }
    };
    let numel = tensor.numel();
    let mut bytes = vec![0u8; numel * tensor.kind().elt_size_in_bytes()];
    tensor.f_copy_data_u8(&mut bytes, numel)?;
    Ok(OwnedView {
        dtype,
        shape: tensor.size().iter().map(|&d| d as usize).collect(),
        bytes,
    })
}

/// Writes `tensors` to `path` atomically (temp file, fsync, rename), with `{"format": "pt"}`
/// plus `extra_metadata` in the header.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    extra_metadata: &[(&str, String)],
) -> Result<()> {
    let bytes = serialize_safetensors(tensors, extra_metadata).map_err(|e| e.with_path(path))?;
    write_atomic(path, &bytes)
}

/// The bytes of a safetensors file holding `tensors`; equal tensors always give equal bytes.
pub fn serialize_safetensors(
    tensors: &[(String, Tensor)],
    extra_metadata: &[(&str, String)],
) -> Result<Vec<u8>> {
    let views = tensors
        .iter()
        .map(|(name, t)| Ok((name.clone(), owned_view(name, t)?)))
        .collect::<Result<Vec<_>>>()?;
    let mut metadata: HashMap<String, String> = HashMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    for (k, v) in extra_metadata {
        metadata.insert(k.to_string(), v.clone());
    }
    let bytes = safetensors::serialize(views.iter().map(|(n, v)| (n.as_str(), v)), Some(metadata))
        .map_err(|e| ModelError::Safetensors {
            path: PathBuf::new(),
            problem: e.to_string(),
        })?;
    Ok(canonical_header(bytes))
}

/// The same file with its JSON header's keys sorted. The metadata arrives as a `HashMap`, whose
/// order changes from process to process; sorted, equal tensors always give equal bytes (and
/// equal blake3 content ids).
fn canonical_header(mut bytes: Vec<u8>) -> Vec<u8> {
    use std::collections::BTreeMap;
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8-byte length")) as usize;
    let header: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).expect("safetensors wrote valid JSON");
    let header: BTreeMap<String, serde_json::Value> = header
        .into_iter()
        .map(|(k, v)| match (k.as_str(), v) {
            ("__metadata__", serde_json::Value::Object(m)) => {
                let sorted: BTreeMap<String, serde_json::Value> = m.into_iter().collect();
                (k, serde_json::to_value(sorted).expect("strings serialise"))
            }
            (_, v) => (k, v),
        })
        .collect();
    let mut text = serde_json::to_vec(&header).expect("JSON serialises");
    if text.len() > n {
        // Cannot happen for the same keys and values; keep the library's bytes if it ever does.
        return bytes;
    }
    text.resize(n, b' '); // safetensors pads its header with spaces too
    bytes[8..8 + n].copy_from_slice(&text);
    bytes
}

/// Writes a file via a temp file in the same dir, fsync and rename, so readers never see half of it.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile_in(dir, path)?;
    tmp.1
        .write_all(bytes)
        .map_err(|e| ModelError::io(&tmp.0, e))?;
    tmp.1.sync_all().map_err(|e| ModelError::io(&tmp.0, e))?;
    std::fs::rename(&tmp.0, path).map_err(|e| ModelError::io(path, e))?;
    Ok(())
}

fn tempfile_in(dir: &Path, target: &Path) -> Result<(PathBuf, File)> {
    let name = target
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let file = File::create(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
    Ok((tmp, file))
}
