//! What a CreateVolume asks for, decided without touching the machine.
//!
//! [`resolve`] turns parameters, capabilities and a capacity range into a [`VolumeSpec`]: the
//! kind, pool, filesystem and exact size. It is pure, so every rule has a table test. Sizes
//! round up only to what the backend needs (4 KiB for images and tmpfs, the mkfs minimum for a
//! filesystem) and only when `limit_bytes` allows; `required == limit` is honoured exactly.

use std::collections::BTreeMap;

use berth_host::FileSystem;

/// Parameter naming the volume kind.
pub const PARAM_KIND: &str = "kind";
/// Parameter naming the pool.
pub const PARAM_POOL: &str = "pool";
/// The fstype parameter external-provisioner and users set.
pub const PARAM_FSTYPE: &str = "csi.storage.k8s.io/fstype";
/// Prefix of parameters the CO adds (PVC name, secrets templates...); accepted and ignored.
pub const CO_PREFIX: &str = "csi.storage.k8s.io/";

/// Size of a volume when the request names none.
pub const DEFAULT_SIZE: u64 = 1 << 30;
const IMAGE_ALIGN: u64 = 4096;

/// How a volume is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A directory with a kernel-enforced size: a btrfs subvolume with a qgroup limit.
    Dir,
    /// An image file with its own filesystem, on a loop device.
    Fs,
    /// An image file exposed as a raw block device.
    Block,
    /// Memory.
    Tmpfs,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Dir => "dir",
            Kind::Fs => "fs",
            Kind::Block => "block",
            Kind::Tmpfs => "tmpfs",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "dir" => Some(Kind::Dir),
            "fs" => Some(Kind::Fs),
            "block" => Some(Kind::Block),
            "tmpfs" => Some(Kind::Tmpfs),
            _ => None,
        }
    }

    /// The access type this kind serves.
    pub fn access_type(self) -> AccessType {
        match self {
            Kind::Block => AccessType::Block,
            _ => AccessType::Mount,
        }
    }

    /// Whether the volume lives in a disk pool (as opposed to memory).
    pub fn uses_pool(self) -> bool {
        !matches!(self, Kind::Tmpfs)
    }
}

/// CSI access type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessType {
    Mount,
    Block,
}

/// CSI access mode, reduced to what a node-local volume can honour.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum AccessMode {
    SingleNodeWriter,
    SingleNodeReaderOnly,
    SingleNodeSingleWriter,
    SingleNodeMultiWriter,
    /// Any multi-node mode, or an unknown one: a node-local volume cannot serve it.
    Unsupported(i32),
}

impl AccessMode {
    /// Whether only readers are allowed.
    pub fn read_only(self) -> bool {
        matches!(self, AccessMode::SingleNodeReaderOnly)
    }

    /// Whether at most one publish may exist (SINGLE_NODE_SINGLE_WRITER).
    pub fn single_writer(self) -> bool {
        matches!(self, AccessMode::SingleNodeSingleWriter)
    }
}

/// One volume capability, decoded from CSI.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Capability {
    pub access_type: AccessType,
    /// Mount only: requested filesystem ("" = any).
    pub fs_type: String,
    /// Mount only: extra mount options.
    pub mount_flags: Vec<String>,
    pub mode: AccessMode,
}

/// The requested size, from CSI's CapacityRange (0 = unset).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CapacityRange {
    pub required: u64,
    pub limit: u64,
}

impl CapacityRange {
    /// Whether an existing size satisfies this range.
    pub fn admits(&self, size: u64) -> bool {
        size >= self.required && (self.limit == 0 || size <= self.limit)
    }
}

/// The decided shape of a new volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeSpec {
    pub kind: Kind,
    pub pool: String,
    /// The filesystem of an `fs` volume.
    pub fs: Option<FileSystem>,
    pub capacity: u64,
}

/// Why a request cannot be served.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// The request is malformed: the field and what is wrong with it.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    /// The capacity range cannot be met by this kind of volume.
    #[error("{0}")]
    OutOfRange(String),
}

fn invalid(field: &str, message: impl Into<String>) -> SpecError {
    SpecError::Invalid {
        field: field.to_owned(),
        message: message.into(),
    }
}

/// Checks capabilities against a volume kind: every one must be servable.
pub fn check_capabilities(kind: Kind, caps: &[Capability]) -> Result<(), SpecError> {
    if caps.is_empty() {
        return Err(invalid("volume_capabilities", "at least one capability is required"));
    }
    for cap in caps {
        if let AccessMode::Unsupported(m) = cap.mode {
            return Err(invalid(
                "volume_capabilities.access_mode",
                format!("mode {m} is not supported: Berth volumes are node-local (use a SINGLE_NODE_* mode)"),
            ));
        }
        if cap.access_type != kind.access_type() {
            let want = match kind.access_type() {
                AccessType::Block => "block",
                AccessType::Mount => "mount",
            };
            return Err(invalid(
                "volume_capabilities.access_type",
                format!("a kind={} volume is used with access type {want}", kind.as_str()),
            ));
        }
        if kind == Kind::Fs && !cap.fs_type.is_empty() && FileSystem::parse(&cap.fs_type).is_none() {
            return Err(invalid(
                "volume_capabilities.mount.fs_type",
                format!("{:?} is not supported; use ext4, xfs or btrfs", cap.fs_type),
            ));
        }
    }
    Ok(())
}

/// Decides kind, pool, filesystem and size for a CreateVolume.
pub fn resolve(
    parameters: &BTreeMap<String, String>,
    caps: &[Capability],
    range: CapacityRange,
    default_pool: &str,
) -> Result<VolumeSpec, SpecError> {
    let mut kind = None;
    let mut pool = None;
    let mut fstype = None;
    for (key, value) in parameters {
        match key.as_str() {
            PARAM_KIND => {
                kind = Some(Kind::parse(value).ok_or_else(|| {
                    invalid(
                        "parameters.kind",
                        format!("{value:?} is not a kind; use dir, fs, block or tmpfs"),
                    )
                })?)
            }
            PARAM_POOL => pool = Some(value.clone()),
            PARAM_FSTYPE => {
                fstype = Some(FileSystem::parse(value).ok_or_else(|| {
                    invalid(
                        "parameters.csi.storage.k8s.io/fstype",
                        format!("{value:?} is not supported; use ext4, xfs or btrfs"),
                    )
                })?)
            }
            k if k.starts_with(CO_PREFIX) => {}
            k => {
                return Err(invalid(
                    &format!("parameters.{k}"),
                    "unknown parameter; valid ones are kind, pool and csi.storage.k8s.io/fstype",
                ));
            }
        }
    }
    if caps.is_empty() {
        return Err(invalid("volume_capabilities", "at least one capability is required"));
    }
    let cap_fs = caps
        .iter()
        .find(|c| c.access_type == AccessType::Mount && !c.fs_type.is_empty())
        .map(|c| c.fs_type.as_str());
    let kind = match kind {
        Some(k) => k,
        None if caps.iter().any(|c| c.access_type == AccessType::Block) => Kind::Block,
        None if fstype.is_some() || cap_fs.is_some() => Kind::Fs,
        None => Kind::Dir,
    };
    check_capabilities(kind, caps)?;

    let fs = match kind {
        Kind::Fs => {
            let from_cap = cap_fs.and_then(FileSystem::parse);
            match (fstype, from_cap) {
                (Some(p), Some(c)) if p != c => {
                    return Err(invalid(
                        "volume_capabilities.mount.fs_type",
                        format!(
                            "asks for {} but parameter csi.storage.k8s.io/fstype says {}",
                            c.as_str(),
                            p.as_str()
                        ),
                    ));
                }
                (p, c) => Some(p.or(c).unwrap_or(FileSystem::Ext4)),
            }
        }
        _ => None,
    };
    let pool = match kind {
        Kind::Tmpfs => {
            if pool.is_some() {
                return Err(invalid(
                    "parameters.pool",
                    "tmpfs volumes live in memory and take no pool",
                ));
            }
            String::new()
        }
        _ => pool.unwrap_or_else(|| default_pool.to_owned()),
    };
    let capacity = size_for(kind, fs, range)?;
    Ok(VolumeSpec {
        kind,
        pool,
        fs,
        capacity,
    })
}

/// The exact size a volume of this kind gets for a range.
pub fn size_for(kind: Kind, fs: Option<FileSystem>, range: CapacityRange) -> Result<u64, SpecError> {
    let CapacityRange { required, limit } = range;
    if limit != 0 && limit < required {
        return Err(invalid(
            "capacity_range",
            format!("limit_bytes {limit} is smaller than required_bytes {required}"),
        ));
    }
    let wanted = match (required, limit) {
        (0, 0) => DEFAULT_SIZE,
        (0, l) => l.min(DEFAULT_SIZE),
        (r, _) => r,
    };
    let minimum = fs.map_or(1, FileSystem::min_size);
    let mut size = wanted.max(minimum);
    if kind != Kind::Dir {
        size = size.div_ceil(IMAGE_ALIGN).saturating_mul(IMAGE_ALIGN);
    }
    if limit != 0 && size > limit {
        let why = match fs {
            Some(f) if size == minimum.div_ceil(IMAGE_ALIGN) * IMAGE_ALIGN => {
                format!("{} needs at least {minimum} bytes", f.as_str())
            }
            _ => format!(
                "{} volumes are sized in multiples of {IMAGE_ALIGN} bytes",
                kind.as_str()
            ),
        };
        return Err(SpecError::OutOfRange(format!(
            "cannot make a volume within limit_bytes {limit}: {why} (would be {size})"
        )));
    }
    Ok(size)
}

/// Mutable parameters each kind honours (ControllerModifyVolume, and CreateVolume's
/// mutable_parameters), with the values allowed.
pub fn check_mutable(kind: Kind, params: &BTreeMap<String, String>) -> Result<(), SpecError> {
    let allowed: &[&str] = match kind {
        Kind::Dir => &["compression"],
        Kind::Fs | Kind::Block => &["readOnly"],
        Kind::Tmpfs => &["inodeLimit"],
    };
    for (k, v) in params {
        let field = format!("mutable_parameters.{k}");
        if !allowed.contains(&k.as_str()) {
            return Err(invalid(
                &field,
                format!(
                    "not a mutable parameter of kind={} volumes; valid: {allowed:?}",
                    kind.as_str()
                ),
            ));
        }
        let ok = match k.as_str() {
            "compression" => matches!(v.as_str(), "none" | "zstd" | "lzo" | "zlib"),
            "readOnly" => matches!(v.as_str(), "true" | "false"),
            "inodeLimit" => v.parse::<u64>().is_ok_and(|n| n > 0),
            _ => false,
        };
        if !ok {
            let want = match k.as_str() {
                "compression" => "none, zstd, lzo or zlib",
                "readOnly" => "true or false",
                _ => "a positive integer",
            };
            return Err(invalid(&field, format!("{v:?} is not valid; use {want}")));
        }
    }
    Ok(())
}

/// Whether a `readOnly` mutable parameter is set to true.
pub fn read_only_param(params: &BTreeMap<String, String>) -> bool {
    params.get("readOnly").is_some_and(|v| v == "true")
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    fn mount(fs: &str) -> Capability {
        Capability {
            access_type: AccessType::Mount,
            fs_type: fs.into(),
            mount_flags: vec![],
            mode: AccessMode::SingleNodeWriter,
        }
    }

    fn block() -> Capability {
        Capability {
            access_type: AccessType::Block,
            fs_type: String::new(),
            mount_flags: vec![],
            mode: AccessMode::SingleNodeWriter,
        }
    }

    fn params(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    const MIB: u64 = 1 << 20;

    #[rstest]
    #[case(&[], vec![mount("")], Kind::Dir, None)]
    #[case(&[], vec![block()], Kind::Block, None)]
    #[case(&[], vec![mount("xfs")], Kind::Fs, Some(FileSystem::Xfs))]
    #[case(&[("csi.storage.k8s.io/fstype", "btrfs")], vec![mount("")], Kind::Fs, Some(FileSystem::Btrfs))]
    #[case(&[("kind", "fs")], vec![mount("")], Kind::Fs, Some(FileSystem::Ext4))]
    #[case(&[("kind", "dir")], vec![mount("ext4")], Kind::Dir, None)]
    #[case(&[("kind", "tmpfs")], vec![mount("")], Kind::Tmpfs, None)]
    #[case(&[("kind", "block"), ("csi.storage.k8s.io/pvc/name", "data")], vec![block()], Kind::Block, None)]
    fn kind_inference(
        #[case] kv: &[(&str, &str)],
        #[case] caps: Vec<Capability>,
        #[case] kind: Kind,
        #[case] fs: Option<FileSystem>,
    ) {
        let r = CapacityRange {
            required: 400 * MIB,
            limit: 0,
        };
        let spec = resolve(&params(kv), &caps, r, "default").unwrap();
        assert_eq!((spec.kind, spec.fs), (kind, fs));
    }

    #[rstest]
    #[case(&[("kind", "nfs")], vec![mount("")], "parameters.kind")]
    #[case(&[("colour", "blue")], vec![mount("")], "parameters.colour")]
    #[case(&[("kind", "dir")], vec![block()], "volume_capabilities.access_type")]
    #[case(&[("kind", "block")], vec![mount("")], "volume_capabilities.access_type")]
    #[case(&[("kind", "fs")], vec![mount("zfs")], "volume_capabilities.mount.fs_type")]
    #[case(&[("csi.storage.k8s.io/fstype", "xfs")], vec![mount("ext4")], "volume_capabilities.mount.fs_type")]
    #[case(&[("kind", "tmpfs"), ("pool", "fast")], vec![mount("")], "parameters.pool")]
    #[case(&[], vec![], "volume_capabilities")]
    fn invalid_requests_name_the_field(
        #[case] kv: &[(&str, &str)],
        #[case] caps: Vec<Capability>,
        #[case] field: &str,
    ) {
        match resolve(&params(kv), &caps, CapacityRange::default(), "default") {
            Err(SpecError::Invalid { field: f, .. }) => assert_eq!(f, field),
            other => panic!("expected invalid {field}, got {other:?}"),
        }
    }

    #[test]
    fn multi_node_modes_are_refused() {
        let mut cap = mount("");
        cap.mode = AccessMode::Unsupported(5);
        assert!(matches!(
            resolve(&params(&[]), &[cap], CapacityRange::default(), "default"),
            Err(SpecError::Invalid { .. })
        ));
    }

    #[rstest]
    #[case(Kind::Dir, None, 0, 0, Ok(DEFAULT_SIZE))]
    #[case(Kind::Dir, None, 0, 10 * MIB, Ok(10 * MIB))]
    #[case(Kind::Dir, None, 1000, 1000, Ok(1000))]
    #[case(Kind::Block, None, 1000, 0, Ok(4096))]
    #[case(Kind::Block, None, 64 * MIB, 64 * MIB, Ok(64 * MIB))]
    #[case(Kind::Tmpfs, None, 5000, 8192, Ok(8192))]
    #[case(Kind::Fs, Some(FileSystem::Xfs), 64 * MIB, 0, Ok(314_572_800))]
    #[case(Kind::Fs, Some(FileSystem::Ext4), 64 * MIB, 64 * MIB, Ok(64 * MIB))]
    fn sizes(
        #[case] kind: Kind,
        #[case] fs: Option<FileSystem>,
        #[case] required: u64,
        #[case] limit: u64,
        #[case] want: Result<u64, ()>,
    ) {
        let got = size_for(kind, fs, CapacityRange { required, limit }).map_err(|_| ());
        assert_eq!(got, want);
    }

    #[test]
    fn xfs_below_its_minimum_is_out_of_range_when_the_limit_forbids_rounding() {
        let r = CapacityRange {
            required: 64 * MIB,
            limit: 64 * MIB,
        };
        match size_for(Kind::Fs, Some(FileSystem::Xfs), r) {
            Err(SpecError::OutOfRange(m)) => assert!(m.contains("xfs needs at least"), "{m}"),
            other => panic!("{other:?}"),
        }
        let r = CapacityRange {
            required: 4097,
            limit: 4097,
        };
        assert!(matches!(size_for(Kind::Block, None, r), Err(SpecError::OutOfRange(_))));
        let r = CapacityRange { required: 10, limit: 5 };
        assert!(matches!(size_for(Kind::Dir, None, r), Err(SpecError::Invalid { .. })));
    }

    #[rstest]
    #[case(Kind::Dir, "compression", "zstd", true)]
    #[case(Kind::Dir, "compression", "brotli", false)]
    #[case(Kind::Dir, "readOnly", "true", false)]
    #[case(Kind::Block, "readOnly", "true", true)]
    #[case(Kind::Fs, "readOnly", "yes", false)]
    #[case(Kind::Tmpfs, "inodeLimit", "1000", true)]
    #[case(Kind::Tmpfs, "inodeLimit", "0", false)]
    #[case(Kind::Tmpfs, "colour", "blue", false)]
    fn mutable_parameters(#[case] kind: Kind, #[case] k: &str, #[case] v: &str, #[case] ok: bool) {
        assert_eq!(check_mutable(kind, &params(&[(k, v)])).is_ok(), ok);
    }

    #[test]
    fn admits_checks_both_ends() {
        let r = CapacityRange {
            required: 10,
            limit: 20,
        };
        assert!(r.admits(10) && r.admits(20) && !r.admits(9) && !r.admits(21));
        assert!(CapacityRange { required: 10, limit: 0 }.admits(1 << 40));
    }
}
