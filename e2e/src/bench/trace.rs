//! Load traces from CSV files for the autoscaling simulation.
//!
//! The format: a header naming four columns, in any order, then one row per
//! point in time; comma-separated numbers, no quoting. Blank lines and lines
//! starting with `#` are ignored (comments), before or after the header.
//!
//! ```text
//! time_s,rate_rps,prompt_tokens,output_tokens
//! 0,5,512,128
//! 900,5,512,128
//! 900,20,512,128
//! 3600,20,512,128
//! ```
//!
//! - `time_s`: seconds from the start; the first row at 0; never decreasing.
//! - `rate_rps`: arrival rate, requests per second, at least 0.
//! - `prompt_tokens`, `output_tokens`: tokens of each request arriving then,
//!   at least 1 (rounded to a whole number after interpolation).
//!
//! Between two rows every value is interpolated **linearly**; two rows at
//! the same time make a **jump** (the second row holds from that time on),
//! so steps and ramps are both one or two rows. After the last row its
//! values hold; the trace lasts until the last row's time.

use std::path::{Path, PathBuf};

/// The four columns, as named in the header.
pub const COLUMNS: [&str; 4] = ["time_s", "rate_rps", "prompt_tokens", "output_tokens"];

/// Tokens per request above this are refused (a typo, not a workload).
pub const MAX_TOKENS: f64 = 1_000_000.0;

/// Longest trace accepted, seconds (a week).
pub const MAX_LENGTH: f64 = 7.0 * 24.0 * 3600.0;

/// Highest arrival rate accepted, requests per second.
pub const MAX_RATE: f64 = 100_000.0;

/// What is wrong with a trace's text. Lines count from 1, comments included.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TraceError {
    /// No header line.
    #[error("no header: expected a first line `{}`", COLUMNS.join(","))]
    NoHeader,
    /// A column the header lacks.
    #[error("line {line}: the header has no column `{column}` (expected `{}`, in any order)", COLUMNS.join(","))]
    MissingColumn {
        /// The header's line.
        line: usize,
        /// The column.
        column: &'static str,
    },
    /// A column the format does not know.
    #[error("line {line}: unknown column `{name}` in the header (expected `{}`, in any order)", COLUMNS.join(","))]
    UnknownColumn {
        /// The header's line.
        line: usize,
        /// What the header said.
        name: String,
    },
    /// A column named twice.
    #[error("line {line}: column `{name}` appears twice in the header")]
    DuplicateColumn {
        /// The header's line.
        line: usize,
        /// The column.
        name: &'static str,
    },
    /// A row with more or fewer fields than the header.
    #[error("line {line}: {found} fields, the header has {expected}")]
    FieldCount {
        /// The row's line.
        line: usize,
        /// Fields in the row.
        found: usize,
        /// Fields in the header.
        expected: usize,
    },
    /// A field that is not a finite number.
    #[error("line {line}: {column} `{value}` is not a finite number")]
    NotANumber {
        /// The row's line.
        line: usize,
        /// The column.
        column: &'static str,
        /// The field.
        value: String,
    },
    /// The first row is not at time 0.
    #[error("line {line}: the first row must be at time 0, not {time} s")]
    FirstRowNotAtZero {
        /// The row's line.
        line: usize,
        /// Its time.
        time: f64,
    },
    /// A time before the previous row's.
    #[error(
        "line {line}: time {time} s is before the previous row's {previous} s (times must not decrease)"
    )]
    NonMonotonicTime {
        /// The row's line.
        line: usize,
        /// Its time.
        time: f64,
        /// The previous row's time.
        previous: f64,
    },
    /// Three rows at one time.
    #[error(
        "line {line}: a third row at time {time} s (two rows at one time make a jump; a third is ambiguous)"
    )]
    ThirdRowAtSameTime {
        /// The row's line.
        line: usize,
        /// Its time.
        time: f64,
    },
    /// A negative arrival rate.
    #[error("line {line}: negative arrival rate {rate} req/s")]
    NegativeRate {
        /// The row's line.
        line: usize,
        /// The rate.
        rate: f64,
    },
    /// A value out of its range.
    #[error("line {line}: {column} {value} is out of range ({range})")]
    OutOfRange {
        /// The row's line.
        line: usize,
        /// The column.
        column: &'static str,
        /// The value.
        value: f64,
        /// The accepted range, in words.
        range: String,
    },
    /// A header and no rows, or a single row.
    #[error(
        "{rows} row(s) after the header: a trace needs at least two, the last one giving its length"
    )]
    TooShort {
        /// Rows read.
        rows: usize,
    },
    /// The last row at time 0.
    #[error(
        "line {line}: the trace ends at time 0 s: the last row's time is its length and must be above 0"
    )]
    ZeroLength {
        /// The last row's line.
        line: usize,
    },
}

/// A trace file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TraceFileError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Its content is not a valid trace.
    #[error("{path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        source: TraceError,
    },
}

/// One row: time, rate, prompt tokens, output tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Row {
    time: f64,
    rate: f64,
    prompt: f64,
    output: f64,
}

/// A trace read from CSV.
#[derive(Debug, Clone, PartialEq)]
pub struct FileTrace {
    /// Its name in the tables (the file's stem).
    pub name: String,
    /// Seed of the arrival draws (by default from the name: see [`name_seed`]).
    pub seed: u64,
    rows: Vec<Row>,
}

/// FNV-1a of the name, so a trace's draws depend on its name only (the
/// same file under the same name gives the same table anywhere).
pub fn name_seed(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The values at one time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    /// Arrival rate, requests per second.
    pub rate: f64,
    /// Prompt tokens of a request arriving then.
    pub prompt_tokens: u32,
    /// Output tokens of a request arriving then.
    pub output_tokens: u32,
}

/// Whole tokens from an interpolated value (validated to lie in 1..=MAX_TOKENS).
fn whole(v: f64) -> u32 {
    v.round().clamp(1.0, MAX_TOKENS) as u32
}

impl FileTrace {
    /// Parses a trace's text; `name` names it in the tables and seeds it.
    pub fn parse(name: &str, text: &str) -> Result<Self, TraceError> {
        let mut lines = text
            .lines()
            .enumerate()
            .map(|(i, l)| (i + 1, l.trim()))
            .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'));
        let (header_line, header) = lines.next().ok_or(TraceError::NoHeader)?;
        // Position of each column in a row.
        let mut index: [Option<usize>; 4] = [None; 4];
        let names: Vec<&str> = header.split(',').map(str::trim).collect();
        for (pos, name) in names.iter().enumerate() {
            let Some(col) = COLUMNS.iter().position(|c| c.eq_ignore_ascii_case(name)) else {
                return Err(TraceError::UnknownColumn {
                    line: header_line,
                    name: (*name).to_string(),
                });
            };
            if index[col].is_some() {
                return Err(TraceError::DuplicateColumn {
                    line: header_line,
                    name: COLUMNS[col],
                });
            }
            index[col] = Some(pos);
        }
        let mut at = [0usize; 4];
        for (col, i) in index.iter().enumerate() {
            at[col] = i.ok_or(TraceError::MissingColumn {
                line: header_line,
                column: COLUMNS[col],
            })?;
        }

        let mut rows: Vec<Row> = Vec::new();
        let mut last_line = header_line;
        for (line, text) in lines {
            last_line = line;
            let fields: Vec<&str> = text.split(',').map(str::trim).collect();
            if fields.len() != names.len() {
                return Err(TraceError::FieldCount {
                    line,
                    found: fields.len(),
                    expected: names.len(),
                });
            }
            let mut v = [0.0; 4];
            for col in 0..4 {
                let field = fields[at[col]];
                v[col] = field
                    .parse::<f64>()
                    .ok()
                    .filter(|x| x.is_finite())
                    .ok_or_else(|| TraceError::NotANumber {
                        line,
                        column: COLUMNS[col],
                        value: field.to_string(),
                    })?;
            }
            let row = Row {
                time: v[0],
                rate: v[1],
                prompt: v[2],
                output: v[3],
            };
            match rows.as_slice() {
                [] if row.time != 0.0 => {
                    return Err(TraceError::FirstRowNotAtZero {
                        line,
                        time: row.time,
                    });
                }
                [.., prev] if row.time < prev.time => {
                    return Err(TraceError::NonMonotonicTime {
                        line,
                        time: row.time,
                        previous: prev.time,
                    });
                }
                [.., a, b] if row.time == a.time && row.time == b.time => {
                    return Err(TraceError::ThirdRowAtSameTime {
                        line,
                        time: row.time,
                    });
                }
                _ => {}
            }
            if row.time > MAX_LENGTH {
                return Err(TraceError::OutOfRange {
                    line,
                    column: "time_s",
                    value: row.time,
                    range: format!("0..={MAX_LENGTH} s, a week"),
                });
            }
            if row.rate < 0.0 {
                return Err(TraceError::NegativeRate {
                    line,
                    rate: row.rate,
                });
            }
            if row.rate > MAX_RATE {
                return Err(TraceError::OutOfRange {
                    line,
                    column: "rate_rps",
                    value: row.rate,
                    range: format!("0..={MAX_RATE} req/s"),
                });
            }
            for (column, value) in [(COLUMNS[2], row.prompt), (COLUMNS[3], row.output)] {
                if !(1.0..=MAX_TOKENS).contains(&value) {
                    return Err(TraceError::OutOfRange {
                        line,
                        column,
                        value,
                        range: format!("1..={MAX_TOKENS} tokens"),
                    });
                }
            }
            rows.push(row);
        }
        if rows.len() < 2 {
            return Err(TraceError::TooShort { rows: rows.len() });
        }
        if rows.last().is_some_and(|r| r.time <= 0.0) {
            return Err(TraceError::ZeroLength { line: last_line });
        }
        Ok(Self {
            name: name.to_string(),
            seed: name_seed(name),
            rows,
        })
    }

    /// Reads and parses a trace file, named by its stem.
    pub fn read(path: &Path) -> Result<Self, TraceFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| TraceFileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let name = path.file_stem().map_or_else(
            || path.display().to_string(),
            |s| s.to_string_lossy().into_owned(),
        );
        Self::parse(&name, &text).map_err(|source| TraceFileError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Seconds the trace lasts (its last row's time).
    pub fn length(&self) -> f64 {
        self.rows.last().map_or(0.0, |r| r.time)
    }

    /// The first jump (two rows at one time), seconds from the start.
    pub fn first_jump(&self) -> Option<f64> {
        self.rows
            .windows(2)
            .find(|w| w[0].time == w[1].time)
            .map(|w| w[0].time)
    }

    /// Rate and tokens at `t`: linear between rows, the later of two rows at
    /// one time, the last row's after it.
    pub fn at(&self, t: f64) -> Point {
        // Rows at or before t; the first row is at 0, so i >= 1 for t >= 0.
        let i = self.rows.partition_point(|r| r.time <= t);
        let Some(r) = self.rows.get(i.saturating_sub(1)) else {
            return Point {
                rate: 0.0,
                prompt_tokens: 1,
                output_tokens: 1,
            };
        };
        let (rate, prompt, output) = match self.rows.get(i) {
            // Strictly after r (r is the last row at or before t).
            Some(next) if i > 0 => {
                let f = (t - r.time) / (next.time - r.time);
                (
                    r.rate + (next.rate - r.rate) * f,
                    r.prompt + (next.prompt - r.prompt) * f,
                    r.output + (next.output - r.output) * f,
                )
            }
            _ => (r.rate, r.prompt, r.output),
        };
        Point {
            rate: rate.max(0.0),
            prompt_tokens: whole(prompt),
            output_tokens: whole(output),
        }
    }

    /// (min, max) of the rate, prompt tokens and output tokens over the rows
    /// (the extremes of the interpolated values too).
    pub fn ranges(&self) -> [(f64, f64); 3] {
        let range = |f: fn(&Row) -> f64| {
            self.rows
                .iter()
                .map(f)
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                    (lo.min(v), hi.max(v))
                })
        };
        [range(|r| r.rate), range(|r| r.prompt), range(|r| r.output)]
    }

    /// Tokens (prompt, output) of every row, whole.
    pub fn row_tokens(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        self.rows.iter().map(|r| (whole(r.prompt), whole(r.output)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<FileTrace, TraceError> {
        FileTrace::parse("t", text)
    }

    #[test]
    fn parses_interpolates_and_jumps() {
        let t = parse(
            "# a comment\n\
             \n\
             time_s, rate_rps, prompt_tokens, output_tokens\n\
             0, 5, 512, 128\n\
             100, 15, 1024, 128\n\
             # the jump\n\
             100, 30, 4096, 64\n\
             200, 30, 4096, 64\n",
        )
        .expect("valid");
        assert_eq!(t.length(), 200.0);
        assert_eq!(t.first_jump(), Some(100.0));
        let p = t.at(0.0);
        assert_eq!((p.rate, p.prompt_tokens, p.output_tokens), (5.0, 512, 128));
        let p = t.at(50.0);
        assert_eq!((p.rate, p.prompt_tokens, p.output_tokens), (10.0, 768, 128));
        let p = t.at(99.75);
        assert!(p.rate < 15.0 && p.rate > 14.9, "{p:?}");
        // At the jump the second row holds.
        let p = t.at(100.0);
        assert_eq!((p.rate, p.prompt_tokens, p.output_tokens), (30.0, 4096, 64));
        // After the last row its values hold.
        assert_eq!(t.at(1e6), t.at(200.0));
        assert_eq!(t.ranges(), [(5.0, 30.0), (512.0, 4096.0), (64.0, 128.0)]);
    }

    #[test]
    fn columns_in_any_order_and_any_case() {
        let a = parse("time_s,rate_rps,prompt_tokens,output_tokens\n0,1,2,3\n10,4,5,6\n")
            .expect("valid");
        let b = parse("OUTPUT_TOKENS,prompt_tokens,Rate_RPS,time_s\n3,2,1,0\n6,5,4,10\n")
            .expect("valid");
        assert_eq!(a, b);
        assert_eq!(a.first_jump(), None);
    }

    #[test]
    fn seeds_follow_the_name() {
        let text = "time_s,rate_rps,prompt_tokens,output_tokens\n0,1,2,3\n10,4,5,6\n";
        let a = FileTrace::parse("a", text).expect("valid");
        let b = FileTrace::parse("b", text).expect("valid");
        assert_ne!(a.seed, b.seed);
        assert_eq!(a.seed, FileTrace::parse("a", text).expect("valid").seed);
    }

    #[test]
    fn bad_inputs_say_which_line_and_what() {
        const H: &str = "time_s,rate_rps,prompt_tokens,output_tokens\n";
        let cases: Vec<(String, TraceError, &str)> = vec![
            ("".into(), TraceError::NoHeader, "no header"),
            (
                "# only a comment\n".into(),
                TraceError::NoHeader,
                "no header",
            ),
            (
                "time_s,rate_rps,prompt_tokens\n0,1,2\n".into(),
                TraceError::MissingColumn {
                    line: 1,
                    column: "output_tokens",
                },
                "line 1: the header has no column `output_tokens`",
            ),
            (
                "time,rate_rps,prompt_tokens,output_tokens\n".into(),
                TraceError::UnknownColumn {
                    line: 1,
                    name: "time".into(),
                },
                "line 1: unknown column `time`",
            ),
            (
                "time_s,rate_rps,rate_rps,prompt_tokens,output_tokens\n".into(),
                TraceError::DuplicateColumn {
                    line: 1,
                    name: "rate_rps",
                },
                "appears twice",
            ),
            (
                format!("{H}0,1,2,3\n10,1,2\n"),
                TraceError::FieldCount {
                    line: 3,
                    found: 3,
                    expected: 4,
                },
                "line 3: 3 fields, the header has 4",
            ),
            (
                format!("{H}0,1,2,3\n10,x,2,3\n"),
                TraceError::NotANumber {
                    line: 3,
                    column: "rate_rps",
                    value: "x".into(),
                },
                "line 3: rate_rps `x` is not a finite number",
            ),
            (
                format!("{H}0,1,2,3\n10,,2,3\n"),
                TraceError::NotANumber {
                    line: 3,
                    column: "rate_rps",
                    value: String::new(),
                },
                "line 3: rate_rps `` is not",
            ),
            (
                format!("{H}0,NaN,2,3\n10,1,2,3\n"),
                TraceError::NotANumber {
                    line: 2,
                    column: "rate_rps",
                    value: "NaN".into(),
                },
                "line 2: rate_rps `NaN`",
            ),
            (
                format!("{H}5,1,2,3\n10,1,2,3\n"),
                TraceError::FirstRowNotAtZero { line: 2, time: 5.0 },
                "line 2: the first row must be at time 0, not 5 s",
            ),
            (
                format!("{H}0,1,2,3\n# comment\n60,1,2,3\n30,1,2,3\n"),
                TraceError::NonMonotonicTime {
                    line: 5,
                    time: 30.0,
                    previous: 60.0,
                },
                "line 5: time 30 s is before the previous row's 60 s",
            ),
            (
                format!("{H}0,1,2,3\n60,1,2,3\n60,2,2,3\n60,3,2,3\n"),
                TraceError::ThirdRowAtSameTime {
                    line: 5,
                    time: 60.0,
                },
                "line 5: a third row at time 60 s",
            ),
            (
                format!("{H}0,1,2,3\n60,-0.5,2,3\n"),
                TraceError::NegativeRate {
                    line: 3,
                    rate: -0.5,
                },
                "line 3: negative arrival rate -0.5 req/s",
            ),
            (
                format!("{H}0,1,0,3\n60,1,2,3\n"),
                TraceError::OutOfRange {
                    line: 2,
                    column: "prompt_tokens",
                    value: 0.0,
                    range: "1..=1000000 tokens".into(),
                },
                "line 2: prompt_tokens 0 is out of range",
            ),
            (
                format!("{H}0,1,2,3\n60,1,2,1e9\n"),
                TraceError::OutOfRange {
                    line: 3,
                    column: "output_tokens",
                    value: 1e9,
                    range: "1..=1000000 tokens".into(),
                },
                "line 3: output_tokens 1000000000 is out of range",
            ),
            (
                format!("{H}0,1,2,3\n"),
                TraceError::TooShort { rows: 1 },
                "1 row(s) after the header",
            ),
            (H.into(), TraceError::TooShort { rows: 0 }, "0 row(s)"),
            (
                format!("{H}0,1,2,3\n0,2,2,3\n"),
                TraceError::ZeroLength { line: 3 },
                "line 3: the trace ends at time 0 s",
            ),
        ];
        for (text, want, message) in cases {
            let err = parse(&text).expect_err(&text);
            assert_eq!(err, want, "{text:?}");
            let shown = err.to_string();
            assert!(shown.contains(message), "{text:?}: {shown}");
        }
    }

    #[test]
    fn a_missing_file_names_the_path() {
        let err = FileTrace::read(Path::new("/nonexistent/trace.csv")).expect_err("missing");
        assert!(
            err.to_string().starts_with("/nonexistent/trace.csv: "),
            "{err}"
        );
    }
}
