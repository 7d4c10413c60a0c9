//! Opening a daemon's redb file. redb locks the file (an OFD lock) for the
//! process that has it open; a restarted daemon can find it still locked
//! for a moment: the previous instance's exit is not yet complete, or a
//! child it forked has not reached its exec (which closes the file). Such a
//! lock is waited for, up to a bound, instead of failing the start (seen
//! once in pdisk's crash walk: "Database already open" right after the
//! crashed pdiskd had been reaped).

use std::path::Path;
use std::time::{Duration, Instant};

use redb::{Database, DatabaseError};

use crate::error::{Error, Result};

/// How long a start waits for another process's lock on its store.
pub const LOCK_WAIT: Duration = Duration::from_secs(10);

/// Opens or creates the redb file at `path`, waiting up to `wait` while
/// another process holds it; then a clear error naming the file.
pub fn open(path: &Path, wait: Duration) -> Result<Database> {
    let start = Instant::now();
    let mut said = false;
    loop {
        match Database::create(path) {
            Err(DatabaseError::DatabaseAlreadyOpen) if start.elapsed() < wait => {
                if !said {
                    tracing::warn!(path = %path.display(), wait_s = wait.as_secs(),
                        "the store is held open by another process (a previous instance still exiting?); waiting");
                    said = true;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(DatabaseError::DatabaseAlreadyOpen) => {
                return Err(Error::unavailable(format!(
                    "{} is held open by another process after {} s: is another instance of this daemon running on the same state directory?",
                    path.display(),
                    wait.as_secs()
                )))
            }
            other => return Ok(other?),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_released_meanwhile_is_waited_for_and_a_lasting_one_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.redb");
        let held = open(&path, LOCK_WAIT).unwrap();
        let err = open(&path, Duration::from_millis(300)).err().unwrap();
        assert!(
            err.to_string().contains("held open by another process"),
            "{err}"
        );
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(held);
        });
        open(&path, Duration::from_secs(10)).expect("opened once the holder let go");
        release.join().unwrap();
    }
}
