//! Reading a guest's serial console log on this host: agentd keeps it as
//! two files, `console.log` and the previous `console.log.1`
//! (`agent::console::ConsoleRing`).
//!
//! [`Tail`] hands out the previous file and then what was appended to the
//! current one since its last read; when agentd rotates the log it
//! finishes the old file (now `console.log.1`) before going on, and starts
//! over when the file shrank or was made anew (a new boot).
//! [`Utf8Chunks`] turns the bytes into text for `--json` without splitting a
//! character that straddles two reads. [`TerminalFilter`] drops what a
//! guest could use to drive the operator's terminal (escape sequences,
//! control characters) unless `--raw` asks for the bytes as they are.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Bytes handed out by one [`Tail::read`] at most, so a large log streams
/// out in pieces instead of being held in memory whole.
pub const READ_LIMIT: u64 = 1 << 20;

pub struct Tail {
    path: PathBuf,
    /// The file being read (device, inode); None before the first read.
    reading: Option<(u64, u64)>,
    offset: u64,
}

fn id_of(m: &std::fs::Metadata) -> (u64, u64) {
    (m.dev(), m.ino())
}

impl Tail {
    pub fn new(path: impl Into<PathBuf>) -> Tail {
        Tail {
            path: path.into(),
            reading: None,
            offset: 0,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Up to [`READ_LIMIT`] bytes not handed out yet; empty when there is
    /// nothing new. Files are opened afresh each time, so a rotated or
    /// replaced log is followed too. NotFound when there is no log.
    pub fn read(&mut self) -> io::Result<Vec<u8>> {
        let current = std::fs::metadata(&self.path)?;
        let rotated = agent::console::rotated(&self.path);
        if self.reading.is_none() {
            // The first read starts with the previous file, if any.
            self.reading = Some(match std::fs::metadata(&rotated) {
                Ok(m) => id_of(&m),
                Err(_) => id_of(&current),
            });
            self.offset = 0;
        }
        if self.reading != Some(id_of(&current)) {
            // Ours is the previous file now (rotated since), or gone.
            if let Ok(file) = File::open(&rotated) {
                if Some(id_of(&file.metadata()?)) == self.reading {
                    let piece = self.read_from(file)?;
                    if !piece.is_empty() {
                        return Ok(piece);
                    }
                }
            }
            self.reading = Some(id_of(&current));
            self.offset = 0;
        }
        let file = File::open(&self.path)?;
        let meta = file.metadata()?;
        if Some(id_of(&meta)) != self.reading || meta.len() < self.offset {
            // Replaced since we looked, or truncated: start over.
            self.reading = Some(id_of(&meta));
            self.offset = 0;
        }
        self.read_from(file)
    }

    fn read_from(&mut self, mut file: File) -> io::Result<Vec<u8>> {
        file.seek(SeekFrom::Start(self.offset))?;
        let mut buf = Vec::new();
        file.take(READ_LIMIT).read_to_end(&mut buf)?;
        self.offset += buf.len() as u64;
        Ok(buf)
    }
}

/// Decodes a byte stream into text piece by piece: invalid bytes become
/// U+FFFD, and an incomplete character at the end of a piece waits for the
/// next one.
#[derive(Default)]
pub struct Utf8Chunks {
    pending: Vec<u8>,
}

impl Utf8Chunks {
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    // `valid_up_to` bytes are valid UTF-8: this never falls back.
                    out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                    match e.error_len() {
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[bad..];
                        }
                        // A character cut short by the end of the data.
                        None => {
                            rest = after;
                            break;
                        }
                    }
                }
            }
        }
        self.pending = rest.to_vec();
        out
    }

    /// What is left when the stream ends: a cut-short character, replaced.
    pub fn finish(&mut self) -> String {
        let rest = std::mem::take(&mut self.pending);
        String::from_utf8_lossy(&rest).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn tail_reads_what_was_appended() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        std::fs::write(&path, "boot\n").unwrap();
        let mut tail = Tail::new(&path);
        assert_eq!(tail.read().unwrap(), b"boot\n");
        assert_eq!(tail.read().unwrap(), b"");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"login: ").unwrap();
        assert_eq!(tail.read().unwrap(), b"login: ");
        // Truncated for a new boot: start over.
        std::fs::write(&path, "again\n").unwrap();
        assert_eq!(tail.read().unwrap(), b"again\n");
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            tail.read().unwrap_err().kind(),
            io::ErrorKind::NotFound,
            "{}",
            tail.path().display()
        );
    }

    #[test]
    fn tail_reads_the_previous_file_first_and_follows_rotations() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let old = agent::console::rotated(&path);
        std::fs::write(&old, "one\n").unwrap();
        std::fs::write(&path, "two\n").unwrap();
        let mut tail = Tail::new(&path);
        let mut got = Vec::new();
        loop {
            let piece = tail.read().unwrap();
            if piece.is_empty() {
                break;
            }
            got.extend(piece);
        }
        assert_eq!(got, b"one\ntwo\n");
        // More is appended, then agentd rotates and starts a new file: the
        // rest of the old one comes first, then the new one.
        let append = |p: &Path, b: &[u8]| {
            use std::io::Write;
            std::fs::OpenOptions::new()
                .append(true)
                .open(p)
                .unwrap()
                .write_all(b)
                .unwrap()
        };
        append(&path, b"three\n");
        std::fs::rename(&path, &old).unwrap();
        std::fs::write(&path, "four, which is longer than what was read\n").unwrap();
        assert_eq!(tail.read().unwrap(), b"three\n");
        assert_eq!(
            tail.read().unwrap(),
            b"four, which is longer than what was read\n"
        );
        assert!(tail.read().unwrap().is_empty());
    }

    #[test]
    fn tail_hands_out_large_logs_in_pieces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        std::fs::write(&path, vec![b'x'; READ_LIMIT as usize + 10]).unwrap();
        let mut tail = Tail::new(&path);
        assert_eq!(tail.read().unwrap().len(), READ_LIMIT as usize);
        assert_eq!(tail.read().unwrap().len(), 10);
        assert!(tail.read().unwrap().is_empty());
    }

    #[test]
    fn characters_split_across_reads_stay_whole() {
        let mut text = Utf8Chunks::default();
        let e_acute = "é".as_bytes();
        assert_eq!(text.push(&[b'a', e_acute[0]]), "a");
        assert_eq!(text.push(&[e_acute[1], b'b']), "éb");
        assert_eq!(text.push(&[0xff, b'c']), "\u{fffd}c");
        assert_eq!(text.push(&[0xe2, 0x82]), "");
        assert_eq!(text.finish(), "\u{fffd}");
        assert_eq!(text.finish(), "");
    }
}

/// Removes terminal control from a guest's console output, piece by piece
/// (a sequence may straddle two reads): ESC sequences (CSI, OSC, DCS, SOS,
/// PM, APC and two-byte ones), C1 controls (U+0080..U+009F, as UTF-8), and
/// C0 controls but tab and newline; a carriage return goes too (CRLF becomes
/// LF), so a guest cannot overwrite a line already shown. What a guest
/// writes is the tenant's: it must not set the operator's window title,
/// remap keys or move the cursor over earlier output.
#[derive(Default)]
pub struct TerminalFilter {
    state: FilterState,
}

#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum FilterState {
    #[default]
    Text,
    /// After ESC.
    Escape,
    /// Inside CSI: parameters until a final byte 0x40..=0x7E.
    Csi,
    /// Inside OSC/DCS/SOS/PM/APC: until BEL or ST (ESC \\).
    String,
    /// ESC seen inside a string: `\\` ends it.
    StringEscape,
    /// After 0xC2: a C1 control follows if the next byte is 0x80..=0x9F.
    Lead,
}

impl TerminalFilter {
    pub fn push(&mut self, bytes: &[u8]) -> Vec<u8> {
        use FilterState::*;
        let mut out = Vec::with_capacity(bytes.len());
        for &b in bytes {
            self.state = match (self.state, b) {
                (Text, 0x1b) => Escape,
                (Text, 0xc2) => Lead,
                (Text, b'\n' | b'\t') => {
                    out.push(b);
                    Text
                }
                (Text, 0x00..=0x1f | 0x7f) => Text,
                (Text, _) => {
                    out.push(b);
                    Text
                }
                // The C1 forms of CSI, and of DCS, SOS, OSC, PM, APC.
                (Lead, 0x9b) => Csi,
                (Lead, 0x90 | 0x98 | 0x9d | 0x9e | 0x9f) => String,
                (Lead, 0x80..=0x9f) => Text,
                (Lead, _) => {
                    out.push(0xc2);
                    // Not a C1 control: handle this byte as text.
                    let mut rest = TerminalFilter { state: Text };
                    out.extend(rest.push(&[b]));
                    rest.state
                }
                (Escape, b'[') => Csi,
                (Escape, b']' | b'P' | b'X' | b'^' | b'_') => String,
                (Escape, 0x20..=0x2f) => Escape,
                (Escape, _) => Text,
                (Csi, 0x40..=0x7e) => Text,
                (Csi, _) => Csi,
                (String, 0x07) => Text,
                (String, 0x1b) => StringEscape,
                (String, _) => String,
                (StringEscape, b'\\') => Text,
                (StringEscape, _) => String,
            };
        }
        out
    }
}

#[cfg(test)]
mod terminal_tests {
    use super::TerminalFilter;

    fn filter_in_pieces(input: &[u8], piece: usize) -> Vec<u8> {
        let mut f = TerminalFilter::default();
        input.chunks(piece).flat_map(|c| f.push(c)).collect()
    }

    #[test]
    fn control_sequences_are_dropped_even_across_reads() {
        let input = "boot\r\n\x1b[2J\x1b[1;1Hclear\x1b]0;owned title\x07 \
                     \x1bP+q544e\x1b\\dcs\x1b(Bcharset\x08\x07bell\u{9b}31mc1\u{85} \
                     caf\u{e9} \u{2603}\tok\n"
            .as_bytes();
        let want = "boot\nclear dcscharsetbellc1 caf\u{e9} \u{2603}\tok\n";
        for piece in [1, 2, 3, 7, input.len()] {
            assert_eq!(
                String::from_utf8(filter_in_pieces(input, piece)).unwrap(),
                want,
                "pieces of {piece}"
            );
        }
    }
}
