//! Directories and files only their owner can open. Everything fhirhaul writes is PHI (the
//! exported resources), state that points at it, or keys: directories are created 0700 and
//! files 0600 (on Unix; elsewhere the platform's defaults apply). Callers run these inside
//! the offload seam, like any other disk work.

use std::fs::File;
use std::io;
use std::path::Path;

/// `std::fs::create_dir_all`, each directory it creates 0700 (existing ones are left as
/// they are).
#[allow(clippy::disallowed_methods)] // Called inside the offload seam.
pub fn create_dir_all(path: &Path) -> io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(path)
}

/// Creates (or truncates) `path` for writing, 0600 when it is created.
#[allow(clippy::disallowed_methods)] // Called inside the offload seam.
pub fn create_file(path: &Path) -> io::Result<File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)
}

/// `std::fs::write` through [`create_file`].
pub fn write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write as _;
    create_file(path)?.write_all(bytes)
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    #[allow(clippy::disallowed_methods)] // The test reads what it wrote.
    fn what_fhirhaul_creates_only_its_owner_can_open() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("tenant/export/deleted");
        create_dir_all(&nested).unwrap();
        for created in [
            dir.path().join("tenant"),
            dir.path().join("tenant/export"),
            nested.clone(),
        ] {
            let mode = std::fs::metadata(&created).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", created.display());
        }
        let file = nested.join("Patient.1.ndjson");
        write(&file, b"{}\n").unwrap();
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read(&file).unwrap(), b"{}\n");
    }
}
