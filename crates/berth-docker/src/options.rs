//! `docker volume create -o KEY=VALUE` options and Docker names, validated without I/O.
//!
//! [`VolumeOptions::parse`] turns the `Opts` map of a `VolumeDriver.Create` into what Berth
//! will make: kind, size, filesystem, pool and where the data comes from. Every refusal says
//! which option is wrong and what would be accepted; an unknown option lists the valid ones.
//! Names are checked with Docker's own rule and are only ever used as engine (CSI) names,
//! never as paths.

use std::collections::BTreeMap;
use std::fmt;

/// Options a user may give, in the order the error message lists them.
pub const VALID_OPTIONS: &[&str] = &["size", "kind", "fstype", "pool", "from", "fromSnapshot"];

/// Docker names and Berth's engine names are both capped at 128 bytes.
const MAX_NAME: usize = 128;

/// Why a request or one of its options was refused. The message is shown to the Docker user.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    #[error("invalid volume name {name:?}: {why}")]
    Name { name: String, why: String },
    #[error("unknown option {key:?}: valid options are {}", VALID_OPTIONS.join(", "))]
    Unknown { key: String },
    #[error("option {key:?} is the local driver's; {hint}")]
    LocalDriver { key: String, hint: &'static str },
    #[error("option {key}={value:?}: {why}")]
    Value { key: String, value: String, why: String },
    #[error("{0}")]
    Conflict(String),
}

fn value_error(key: &str, value: &str, why: impl Into<String>) -> OptionError {
    OptionError::Value {
        key: key.to_owned(),
        value: value.to_owned(),
        why: why.into(),
    }
}

/// A Docker volume name: `[a-zA-Z0-9][a-zA-Z0-9_.-]+`, at most 128 bytes, no `..`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VolumeName(String);

impl VolumeName {
    /// Checks a name with Docker's rule (`volume/local`'s `validateName`) and Berth's length
    /// and `..` limits.
    pub fn parse(s: &str) -> Result<VolumeName, OptionError> {
        let refuse = |why: &str| OptionError::Name {
            name: s.chars().take(MAX_NAME + 8).collect(),
            why: why.to_owned(),
        };
        let bytes = s.as_bytes();
        let Some(first) = bytes.first() else {
            return Err(refuse("a name is required"));
        };
        if bytes.len() < 2 {
            return Err(refuse("use at least two characters (Docker's rule)"));
        }
        if bytes.len() > MAX_NAME {
            return Err(refuse("use at most 128 characters"));
        }
        if !first.is_ascii_alphanumeric() {
            return Err(refuse("start with a letter or a digit"));
        }
        if !bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        {
            return Err(refuse("use only letters, digits, '_', '.' and '-'"));
        }
        // Docker allows it, but Berth's engine refuses names containing "..".
        if s.contains("..") {
            return Err(refuse("do not use \"..\""));
        }
        Ok(VolumeName(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VolumeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for VolumeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VolumeName({})", self.0)
    }
}

/// How a Docker volume is stored (the engine's kinds that give a directory).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DockerKind {
    /// A btrfs subvolume with a qgroup limit: instant to create, no loop device; a full volume
    /// answers "Disk quota exceeded" and `df` shows the pool.
    Dir,
    /// An image file with its own filesystem (ext4 unless `fstype` says otherwise) on a loop
    /// device: the default, because it behaves like a disk of that size to a container (a full
    /// volume answers "No space left on device", `df` shows the volume).
    Fs,
    /// Memory.
    Tmpfs,
}

impl DockerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DockerKind::Dir => "dir",
            DockerKind::Fs => "fs",
            DockerKind::Tmpfs => "tmpfs",
        }
    }
}

/// Where a new volume's data comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Empty,
    /// `from=<volume>`: a clone of another Docker volume.
    Volume(VolumeName),
    /// `fromSnapshot=<snapshot>`: restored from a snapshot.
    Snapshot(String),
}

/// What a `VolumeDriver.Create` asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeOptions {
    pub kind: DockerKind,
    /// Bytes; `None` leaves the engine's default (1 GiB).
    pub size: Option<u64>,
    /// Filesystem of an `fs` volume.
    pub fstype: Option<String>,
    pub pool: Option<String>,
    pub source: Source,
}

impl VolumeOptions {
    /// Validates `Opts` (absent or null means no options).
    pub fn parse(opts: &BTreeMap<String, String>) -> Result<VolumeOptions, OptionError> {
        let mut kind = None;
        let mut size = None;
        let mut fstype = None;
        let mut pool = None;
        let mut from = None;
        let mut from_snapshot = None;
        for (key, value) in opts {
            match key.as_str() {
                "size" => size = Some(parse_size(value).map_err(|why| value_error(key, value, why))?),
                "kind" => {
                    kind = Some(match value.as_str() {
                        "dir" => DockerKind::Dir,
                        "fs" => DockerKind::Fs,
                        "tmpfs" => DockerKind::Tmpfs,
                        "block" => {
                            return Err(value_error(
                                key,
                                value,
                                "a container needs a directory; use dir, fs or tmpfs",
                            ));
                        }
                        _ => return Err(value_error(key, value, "use dir, fs or tmpfs")),
                    })
                }
                "fstype" => match value.as_str() {
                    "ext4" | "xfs" | "btrfs" => fstype = Some(value.clone()),
                    _ => return Err(value_error(key, value, "use ext4, xfs or btrfs")),
                },
                "pool" => {
                    check_plain(value).map_err(|why| value_error(key, value, why))?;
                    pool = Some(value.clone());
                }
                "from" => {
                    let name = VolumeName::parse(value).map_err(|e| value_error(key, value, e.to_string()))?;
                    from = Some(name);
                }
                "fromSnapshot" => {
                    check_plain(value).map_err(|why| value_error(key, value, why))?;
                    from_snapshot = Some(value.clone());
                }
                "type" | "device" | "o" => {
                    return Err(OptionError::LocalDriver {
                        key: key.clone(),
                        hint: "Berth makes its own storage: use kind=dir|fs|tmpfs, fstype=ext4|xfs|btrfs and size",
                    });
                }
                _ => return Err(OptionError::Unknown { key: key.clone() }),
            }
        }
        if (from.is_some() || from_snapshot.is_some()) && (kind.is_some() || fstype.is_some() || pool.is_some()) {
            return Err(OptionError::Conflict(
                "a clone (from=) or restore (fromSnapshot=) has the kind, fstype and pool of its source; drop kind, fstype and pool"
                    .to_owned(),
            ));
        }
        let kind = match (kind, &fstype) {
            (Some(DockerKind::Fs) | None, Some(_)) => DockerKind::Fs,
            (Some(k), Some(fs)) => {
                return Err(OptionError::Conflict(format!(
                    "fstype={fs} applies to kind=fs only, not kind={}",
                    k.as_str()
                )));
            }
            (Some(k), None) => k,
            (None, None) => DockerKind::Fs,
        };
        if kind == DockerKind::Tmpfs && pool.is_some() {
            return Err(OptionError::Conflict(
                "kind=tmpfs volumes live in memory and take no pool".to_owned(),
            ));
        }
        if size == Some(0) {
            return Err(value_error("size", "0", "a volume needs at least one byte"));
        }
        let source = match (from, from_snapshot) {
            (Some(_), Some(_)) => {
                return Err(OptionError::Conflict(
                    "give either from=<volume> or fromSnapshot=<snapshot>, not both".to_owned(),
                ));
            }
            (Some(v), None) => Source::Volume(v),
            (None, Some(s)) => Source::Snapshot(s),
            (None, None) => Source::Empty,
        };
        Ok(VolumeOptions {
            kind,
            size,
            fstype,
            pool,
            source,
        })
    }

    /// The engine's CreateVolume parameters for these options.
    pub fn engine_parameters(&self) -> BTreeMap<String, String> {
        let mut p = BTreeMap::new();
        p.insert(
            berth_storage::spec::PARAM_KIND.to_owned(),
            self.kind.as_str().to_owned(),
        );
        if let Some(fs) = &self.fstype {
            p.insert(berth_storage::spec::PARAM_FSTYPE.to_owned(), fs.clone());
        }
        if let Some(pool) = &self.pool {
            p.insert(berth_storage::spec::PARAM_POOL.to_owned(), pool.clone());
        }
        p
    }
}

/// Pool and snapshot names: `[A-Za-z0-9._-]`, 1 to 128 bytes, no `..`.
fn check_plain(s: &str) -> Result<(), String> {
    berth_storage::id::check_client_id(s).map_err(|e| e.to_string())
}

/// Parses a size the way Docker's `units.RAMInBytes` does: binary units, case-insensitive,
/// optional `i`/`b` (`64M`, `64m`, `64MiB`, `1.5G`, `512k`, `1073741824`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    const HINT: &str = "use a number of bytes or a number with K, M, G, T or P (e.g. 64M, 1G)";
    let t = s.trim();
    let end = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(end);
    let unit = unit.trim_start_matches(' ');
    let lower = unit.to_ascii_lowercase();
    let rest = lower.strip_suffix('b').unwrap_or(&lower);
    let rest = rest.strip_suffix('i').unwrap_or(rest);
    let shift = match rest {
        "" if lower.is_empty() || lower == "b" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        "p" => 50,
        _ => return Err(format!("unknown unit {unit:?}; {HINT}")),
    };
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    if int.is_empty() || (num.contains('.') && frac.is_empty()) || frac.contains('.') {
        return Err(format!("not a size; {HINT}"));
    }
    let too_large = || format!("too large; {HINT}");
    let int: u64 = int.parse().map_err(|_| too_large())?;
    let mut bytes = int.checked_mul(1u64 << shift).ok_or_else(too_large)?;
    // The fraction, exactly: frac / 10^len of the unit, rounded down to a byte.
    if !frac.is_empty() {
        let digits = &frac[..frac.len().min(18)];
        let numer: u128 = digits.parse().map_err(|_| format!("not a size; {HINT}"))?;
        let denom = 10u128.pow(u32::try_from(digits.len()).unwrap_or(18));
        let add = numer * (1u128 << shift) / denom;
        bytes = u64::try_from(add)
            .ok()
            .and_then(|a| bytes.checked_add(a))
            .ok_or_else(too_large)?;
    }
    Ok(bytes)
}

/// Formats bytes for people: `64 MiB`, `1.5 GiB`, `812 B`.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut unit = 0;
    let mut whole = bytes;
    while whole >= 1024 && unit < UNITS.len() - 1 {
        whole /= 1024;
        unit += 1;
    }
    if unit == 0 {
        return format!("{bytes} B");
    }
    let scale = 1u128 << (10 * unit);
    // One decimal, rounded down, dropped when it is zero.
    let tenths = u128::from(bytes) * 10 / scale;
    if tenths.is_multiple_of(10) {
        format!("{} {}", tenths / 10, UNITS[unit])
    } else {
        format!("{}.{} {}", tenths / 10, tenths % 10, UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rstest::rstest;

    fn opts(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[rstest]
    #[case("64M", Ok(64 << 20))]
    #[case("64m", Ok(64 << 20))]
    #[case("64MiB", Ok(64 << 20))]
    #[case("64mb", Ok(64 << 20))]
    #[case("64 MB", Ok(64 << 20))]
    #[case("1G", Ok(1 << 30))]
    #[case("1.5G", Ok(3 << 29))]
    #[case("512k", Ok(512 << 10))]
    #[case("1073741824", Ok(1 << 30))]
    #[case("100b", Ok(100))]
    #[case("2T", Ok(2 << 40))]
    #[case("", Err(()))]
    #[case("M", Err(()))]
    #[case("64X", Err(()))]
    #[case("-1G", Err(()))]
    #[case("1..5G", Err(()))]
    #[case("1.G", Err(()))]
    #[case("99999999999P", Err(()))]
    #[case("64MM", Err(()))]
    fn sizes(#[case] input: &str, #[case] want: Result<u64, ()>) {
        assert_eq!(parse_size(input).map_err(|_| ()), want);
    }

    #[rstest]
    #[case(0, "0 B")]
    #[case(1023, "1023 B")]
    #[case(64 << 20, "64 MiB")]
    #[case(3 << 29, "1.5 GiB")]
    #[case(1 << 40, "1 TiB")]
    fn human(#[case] bytes: u64, #[case] want: &str) {
        assert_eq!(human_size(bytes), want);
    }

    #[rstest]
    #[case("v1", true)]
    #[case("my_vol.2-a", true)]
    #[case("0abc", true)]
    #[case("a", false)]
    #[case("", false)]
    #[case("_vol", false)]
    #[case(".hidden", false)]
    #[case("a/b", false)]
    #[case("../etc", false)]
    #[case("a..b", false)]
    #[case("sp ace", false)]
    #[case("nul\0x", false)]
    #[case("é-accent", false)]
    fn names(#[case] name: &str, #[case] ok: bool) {
        assert_eq!(VolumeName::parse(name).is_ok(), ok, "{name:?}");
    }

    #[test]
    fn long_names_are_refused() {
        assert!(VolumeName::parse(&"a".repeat(128)).is_ok());
        assert!(VolumeName::parse(&"a".repeat(129)).is_err());
    }

    #[test]
    fn no_options_make_a_default_fs_volume() {
        let o = VolumeOptions::parse(&BTreeMap::new()).unwrap();
        assert_eq!(
            o,
            VolumeOptions {
                kind: DockerKind::Fs,
                size: None,
                fstype: None,
                pool: None,
                source: Source::Empty
            }
        );
        assert_eq!(o.engine_parameters(), opts(&[("kind", "fs")]));
    }

    #[rstest]
    #[case(&[("size", "64M")], DockerKind::Fs, Some(64 << 20), None)]
    #[case(&[("kind", "dir"), ("size", "1g")], DockerKind::Dir, Some(1 << 30), None)]
    #[case(&[("kind", "tmpfs"), ("size", "1G")], DockerKind::Tmpfs, Some(1 << 30), None)]
    #[case(&[("fstype", "xfs")], DockerKind::Fs, None, Some("xfs"))]
    #[case(&[("kind", "fs"), ("fstype", "btrfs")], DockerKind::Fs, None, Some("btrfs"))]
    #[case(&[("kind", "fs")], DockerKind::Fs, None, None)]
    fn valid_options(
        #[case] kv: &[(&str, &str)],
        #[case] kind: DockerKind,
        #[case] size: Option<u64>,
        #[case] fs: Option<&str>,
    ) {
        let o = VolumeOptions::parse(&opts(kv)).unwrap();
        assert_eq!((o.kind, o.size, o.fstype.as_deref()), (kind, size, fs));
    }

    #[test]
    fn fs_options_reach_the_engine_parameters() {
        let o = VolumeOptions::parse(&opts(&[("fstype", "xfs"), ("pool", "fast")])).unwrap();
        assert_eq!(
            o.engine_parameters(),
            opts(&[("kind", "fs"), ("csi.storage.k8s.io/fstype", "xfs"), ("pool", "fast")])
        );
    }

    #[test]
    fn clone_sources_parse() {
        let o = VolumeOptions::parse(&opts(&[("from", "v1")])).unwrap();
        assert_eq!(o.source, Source::Volume(VolumeName::parse("v1").unwrap()));
        let o = VolumeOptions::parse(&opts(&[("fromSnapshot", "snap-1")])).unwrap();
        assert_eq!(o.source, Source::Snapshot("snap-1".into()));
    }

    #[rstest]
    #[case(&[("colour", "blue")], "unknown option \"colour\": valid options are size, kind, fstype, pool, from, fromSnapshot")]
    #[case(&[("size", "64X")], "option size=\"64X\": unknown unit")]
    #[case(&[("size", "0")], "at least one byte")]
    #[case(&[("kind", "block")], "a container needs a directory")]
    #[case(&[("kind", "nfs")], "use dir, fs or tmpfs")]
    #[case(&[("fstype", "zfs")], "use ext4, xfs or btrfs")]
    #[case(&[("kind", "dir"), ("fstype", "ext4")], "applies to kind=fs only")]
    #[case(&[("kind", "tmpfs"), ("pool", "p")], "take no pool")]
    #[case(&[("from", "v1"), ("fromSnapshot", "s")], "not both")]
    #[case(&[("from", "v1"), ("kind", "dir")], "drop kind, fstype and pool")]
    #[case(&[("fromSnapshot", "s1"), ("pool", "p")], "drop kind, fstype and pool")]
    #[case(&[("from", "../x")], "invalid volume name")]
    #[case(&[("fromSnapshot", "../x")], "option fromSnapshot")]
    #[case(&[("pool", "a/b")], "option pool")]
    #[case(&[("type", "tmpfs")], "local driver's")]
    #[case(&[("o", "size=1m")], "kind=dir|fs|tmpfs")]
    fn invalid_options_say_what_to_do(#[case] kv: &[(&str, &str)], #[case] needle: &str) {
        let err = VolumeOptions::parse(&opts(kv)).unwrap_err().to_string();
        assert!(err.contains(needle), "{err:?} lacks {needle:?}");
    }

    proptest! {
        #[test]
        fn size_parser_never_panics(s in "\\PC{0,24}") {
            let _ = parse_size(&s);
        }

        #[test]
        fn sizes_round_trip_through_units(n in 1u64..1_000_000, unit in 0usize..4) {
            let (suffix, shift) = [("", 0), ("K", 10), ("M", 20), ("G", 30)][unit];
            prop_assert_eq!(parse_size(&format!("{n}{suffix}")), Ok(n << shift));
        }

        #[test]
        fn name_parser_never_panics(s in "\\PC{0,200}") {
            if let Ok(n) = VolumeName::parse(&s) {
                prop_assert!(!n.as_str().contains('/'));
            }
        }
    }
}
