//! Input text: files, documents, tokenization and packing into contexts.
//!
//! Inputs: a file, a directory (every `.jsonl`, `.txt` and `.parquet` file below it; not
//! `.json`, which in a dataset directory is metadata such as `dataset_info.json`), or a glob
//! whose last component has `*`/`?` (`data/part-*.jsonl`); files are read in sorted path order.
//! A `.jsonl` file, or a `.json` file named itself or by a glob, holds one JSON object per line
//! with a string `text`; a `.parquet` file (HF datasets layout) a `text` column (string, or
//! binary holding UTF-8), else a pre-tokenized `input_ids` list column (a leading BOS is
//! dropped), read one row group at a time; any other file is one plain-text document. Text
//! must be UTF-8.
//!
//! Packing: each document is tokenized without special tokens; the documents form one stream,
//! each document after the first preceded by BOS, so a model sees every document start after a
//! BOS. A context is BOS followed by the next `context - 1` tokens of the stream; documents run
//! on across contexts, and a document that opens a context gets that context's BOS only. The tail of the stream that does not fill a context is not used.

use crate::error::{Error, Result};
use rayon::prelude::*;
use std::collections::VecDeque;
use std::io::BufRead;
use std::path::{Path, PathBuf};

/// The input files of `path`, in the order they are read.
pub fn input_files(path: &Path) -> Result<Vec<PathBuf>> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if name.contains(['*', '?']) {
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
            let p = e.map_err(|e| Error::io(dir, e))?.path();
            if p.is_file()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| wildcard(name, n))
            {
                out.push(p);
            }
        }
        out.sort();
        if out.is_empty() {
            return Err(Error::Data {
                path: path.to_path_buf(),
                msg: "no file matches".into(),
            });
        }
        return Ok(out);
    }
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut out = Vec::new();
    let mut dirs = vec![path.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).map_err(|e| Error::io(&d, e))? {
            let p = e.map_err(|e| Error::io(&d, e))?.path();
            if p.is_dir() {
                dirs.push(p);
            } else if matches!(
                p.extension().and_then(|x| x.to_str()),
                Some("jsonl" | "txt" | "parquet")
            ) {
                out.push(p);
            }
        }
    }
    out.sort();
    if out.is_empty() {
        return Err(Error::Data {
            path: path.to_path_buf(),
            msg: "no .jsonl, .txt or .parquet files".into(),
        });
    }
    Ok(out)
}

/// `*` matches any run of characters, `?` any one character.
fn wildcard(pat: &str, s: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pat.chars().collect(), s.chars().collect());
    // Classic backtracking over the last `*`.
    let (mut i, mut j, mut star, mut mark) = (0, 0, None, 0);
    while j < t.len() {
        if i < p.len() && (p[i] == '?' || p[i] == t[j]) {
            i += 1;
            j += 1;
        } else if i < p.len() && p[i] == '*' {
            star = Some(i);
            mark = j;
            i += 1;
        } else if let Some(st) = star {
            i = st + 1;
            mark += 1;
            j = mark;
        } else {
            return false;
        }
    }
    p[i..].iter().all(|&c| c == '*')
}

/// One document: text to tokenize, or token ids from a pre-tokenized parquet column.
#[derive(Debug, Clone, PartialEq)]
pub enum Doc {
    Text(String),
    /// The next piece of the document before it (a plain-text file is read in pieces).
    More(String),
    Ids(Vec<u32>),
}

/// A plain-text file is one document, read in pieces of about this many bytes, each cut after
/// a blank line (else after a line) so that memory stays bounded for multi-GB files.
const TEXT_PIECE: usize = 1 << 20;

enum Reader {
    Jsonl(std::io::BufReader<std::fs::File>),
    /// A plain-text file, the bytes read past the last piece's cut, and the file offset of
    /// the next piece.
    Text(std::fs::File, Vec<u8>, u64),
    /// Rows of the one projected column; `true` when it is `input_ids`.
    Parquet(parquet::record::reader::RowIter<'static>, bool),
    /// A string or binary `text` column.
    ParquetText(Box<TextColumn>),
}

/// A parquet `text` column read as bytes, one value at a time. Not the row API: its UTF-8
/// error lists every byte of the value twice.
struct TextColumn {
    file: parquet::file::serialized_reader::SerializedFileReader<std::fs::File>,
    col: usize,
    nullable: bool,
    /// The next row group to open.
    group: usize,
    column: Option<parquet::column::reader::ColumnReaderImpl<parquet::data_type::ByteArrayType>>,
}

impl TextColumn {
    /// The next row's value (`Some(None)`: null), or `None` at the end of the file.
    fn next(&mut self) -> parquet::errors::Result<Option<Option<Vec<u8>>>> {
        use parquet::file::reader::FileReader;
        loop {
            let Some(column) = &mut self.column else {
                if self.group == self.file.num_row_groups() {
                    return Ok(None);
                }
                let g = self.file.get_row_group(self.group)?;
                self.group += 1;
                self.column = Some(parquet::column::reader::get_typed_column_reader(
                    g.get_column_reader(self.col)?,
                ));
                continue;
            };
            let (mut defs, mut values) = (Vec::new(), Vec::new());
            let (rows, ..) =
                column.read_records(1, self.nullable.then_some(&mut defs), None, &mut values)?;
            if rows == 0 {
                self.column = None;
                continue;
            }
            return Ok(Some(values.pop().map(|v| v.data().to_vec())));
        }
    }
}

/// Documents of the input files, read lazily: one file open at a time, parquet one row group
/// at a time.
pub struct Documents {
    files: VecDeque<PathBuf>,
    /// The open file, its reader and the number of the last line or row read (1-based).
    current: Option<(PathBuf, Reader, usize)>,
}

fn ext(p: &Path) -> &str {
    p.extension().and_then(|x| x.to_str()).unwrap_or("")
}

/// A parquet file's row iterator over its `text` column, else its `input_ids` column.
fn open_parquet(p: &Path) -> Result<Reader> {
    use parquet::basic::Type as PhysicalType;
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let bad = |msg: String| Error::Data {
        path: p.to_path_buf(),
        msg,
    };
    let f = std::fs::File::open(p).map_err(|e| Error::io(p, e))?;
    let r = SerializedFileReader::new(f)
        .map_err(|e| bad(format!("not a readable parquet file: {e}")))?;
    let root = r
        .metadata()
        .file_metadata()
        .schema_descr()
        .root_schema()
        .clone();
    let fields = root.get_fields();
    let (field, ids) = match ["text", "input_ids"]
        .iter()
        .find_map(|n| fields.iter().find(|f| f.name() == *n))
    {
        Some(f) => (f.clone(), f.name() == "input_ids"),
        None => return Err(bad("no `text` or `input_ids` column".into())),
    };
    if !ids && field.is_primitive() && field.get_physical_type() == PhysicalType::BYTE_ARRAY {
        let schema = r.metadata().file_metadata().schema_descr_ptr();
        let col = (schema.columns().iter())
            .position(|c| c.path().parts() == ["text"])
            .ok_or_else(|| bad("no `text` column".into()))?;
        return Ok(Reader::ParquetText(Box::new(TextColumn {
            nullable: schema.column(col).max_def_level() > 0,
            file: r,
            col,
            group: 0,
            column: None,
        })));
    }
    let proj = parquet::schema::types::Type::group_type_builder(root.name())
        .with_fields(vec![field])
        .build()
        .map_err(|e| bad(e.to_string()))?;
    let rows = parquet::record::reader::RowIter::from_file_into(Box::new(r))
        .project(Some(proj))
        .map_err(|e| bad(e.to_string()))?;
    Ok(Reader::Parquet(rows, ids))
}

fn parquet_doc(row: parquet::record::Row, ids: bool) -> std::result::Result<Doc, String> {
    use parquet::record::Field;
    let Some((_, field)) = row.into_columns().into_iter().next() else {
        return Err("empty row".into());
    };
    match (field, ids) {
        (Field::Str(s), false) => Ok(Doc::Text(s)),
        (Field::ListInternal(l), true) => l
            .elements()
            .iter()
            .map(|x| match x {
                Field::Int(v) => u32::try_from(*v).map_err(|_| format!("token id {v}")),
                Field::Long(v) => u32::try_from(*v).map_err(|_| format!("token id {v}")),
                Field::UInt(v) => Ok(*v),
                Field::ULong(v) => u32::try_from(*v).map_err(|_| format!("token id {v}")),
                Field::Short(v) => u32::try_from(*v).map_err(|_| format!("token id {v}")),
                o => Err(format!("`input_ids` element {o} is not an integer")),
            })
            .collect::<std::result::Result<Vec<u32>, String>>()
            .map(Doc::Ids),
        (Field::Null, _) => Err(format!(
            "`{}` is null",
            if ids { "input_ids" } else { "text" }
        )),
        (o, false) => Err(format!("`text` is not a string: {o}")),
        (o, true) => Err(format!("`input_ids` is not a list: {o}")),
    }
}

/// The next piece of a plain-text file: at least `TEXT_PIECE` bytes (unless the file ends),
/// cut after the last blank line in them, else after the last newline, else after a whole
/// UTF-8 character; `None` at the end. `rest` carries the bytes past the cut.
fn text_piece(f: &mut std::fs::File, rest: &mut Vec<u8>) -> std::io::Result<Option<Vec<u8>>> {
    use std::io::Read;
    let mut buf = [0u8; 1 << 16];
    while rest.len() < TEXT_PIECE {
        let got = f.read(&mut buf)?;
        if got == 0 {
            return Ok((!rest.is_empty()).then(|| std::mem::take(rest)));
        }
        rest.extend_from_slice(&buf[..got]);
    }
    // Never inside a run of newlines: the tokenizer merges runs.
    let blank = (rest.windows(3))
        .rposition(|w| w[..2] == *b"\n\n" && w[2] != b'\n')
        .map(|i| i + 2);
    let line = (rest.windows(2))
        .rposition(|w| w[0] == b'\n' && w[1] != b'\n')
        .map(|i| i + 1);
    // A UTF-8 continuation byte is 10xxxxxx: cut before the last character's first byte.
    let char_start = rest
        .iter()
        .rposition(|&b| b & 0xC0 != 0x80)
        .filter(|&i| i > 0);
    let cut = blank.or(line).or(char_start).unwrap_or(rest.len());
    let tail = rest.split_off(cut);
    Ok(Some(std::mem::replace(rest, tail)))
}

impl Documents {
    pub fn new(files: Vec<PathBuf>) -> Documents {
        Documents {
            files: files.into(),
            current: None,
        }
    }

    /// The file being read, for errors found after a document left it.
    fn current_path(&self) -> PathBuf {
        self.current
            .as_ref()
            .map(|c| c.0.clone())
            .unwrap_or_default()
    }

    /// The next document, or `None` at the end of the data.
    pub fn next_doc(&mut self) -> Result<Option<Doc>> {
        loop {
            if self.current.is_none() {
                let Some(p) = self.files.pop_front() else {
                    return Ok(None);
                };
                let reader = match ext(&p) {
                    "jsonl" | "json" => {
                        let f = std::fs::File::open(&p).map_err(|e| Error::io(&p, e))?;
                        Reader::Jsonl(std::io::BufReader::new(f))
                    }
                    "parquet" => open_parquet(&p)?,
                    _ => Reader::Text(
                        std::fs::File::open(&p).map_err(|e| Error::io(&p, e))?,
                        Vec::new(),
                        0,
                    ),
                };
                self.current = Some((p, reader, 0));
            }
            let (p, reader, n) = self.current.as_mut().unwrap();
            *n += 1;
            match reader {
                Reader::Text(f, rest, offset) => {
                    match text_piece(f, rest).map_err(|e| Error::io(p, e))? {
                        None => self.current = None,
                        Some(bytes) => {
                            let at = *offset;
                            *offset += bytes.len() as u64;
                            let text = String::from_utf8(bytes).map_err(|e| Error::Data {
                                path: p.clone(),
                                msg: format!(
                                    "not UTF-8 (byte {})",
                                    at + e.utf8_error().valid_up_to() as u64
                                ),
                            })?;
                            return Ok(Some(if at == 0 {
                                Doc::Text(text)
                            } else {
                                Doc::More(text)
                            }));
                        }
                    }
                }
                Reader::Parquet(rows, ids) => {
                    let bad = |msg: String| Error::Data {
                        path: p.clone(),
                        msg: format!("row {n}: {msg}"),
                    };
                    match rows.next() {
                        None => self.current = None,
                        Some(row) => {
                            let row = row.map_err(|e| bad(e.to_string()))?;
                            return parquet_doc(row, *ids).map(Some).map_err(bad);
                        }
                    }
                }
                Reader::ParquetText(column) => {
                    let bad = |msg: String| Error::Data {
                        path: p.clone(),
                        msg: format!("row {n}: {msg}"),
                    };
                    match column.next().map_err(|e| bad(e.to_string()))? {
                        None => self.current = None,
                        Some(None) => return Err(bad("`text` is null".into())),
                        Some(Some(bytes)) => {
                            let text = String::from_utf8(bytes).map_err(|e| {
                                bad(format!("not UTF-8 (byte {})", e.utf8_error().valid_up_to()))
                            })?;
                            return Ok(Some(Doc::Text(text)));
                        }
                    }
                }
                Reader::Jsonl(r) => {
                    let mut buf = Vec::new();
                    let got = r.read_until(b'\n', &mut buf).map_err(|e| Error::io(p, e))?;
                    if got == 0 {
                        self.current = None;
                        continue;
                    }
                    let bad = |msg: String| Error::Data {
                        path: p.clone(),
                        msg: format!("line {n}: {msg}"),
                    };
                    let s = std::str::from_utf8(&buf)
                        .map_err(|e| bad(format!("not UTF-8 (byte {})", e.valid_up_to())))?;
                    if s.trim().is_empty() {
                        continue;
                    }
                    let v: serde_json::Value =
                        serde_json::from_str(s).map_err(|e| bad(format!("not JSON: {e}")))?;
                    return match v.get("text") {
                        Some(serde_json::Value::String(t)) => Ok(Some(Doc::Text(t.clone()))),
                        Some(_) => Err(bad("`text` is not a string".into())),
                        None => Err(bad("no `text` field".into())),
                    };
                }
            }
        }
    }
}

/// The checkpoint's `tokenizer.json`.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub path: PathBuf,
}

impl Tokenizer {
    pub fn load(model_dir: &Path) -> Result<Tokenizer> {
        let path = model_dir.join("tokenizer.json");
        if !path.exists() {
            return Err(Error::Data {
                path,
                msg: "missing".into(),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| Error::Data {
            path: path.clone(),
            msg: format!("cannot load tokenizer: {e}"),
        })?;
        Ok(Tokenizer { inner, path })
    }

    /// Token ids of `text`, without special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| Error::Data {
            path: self.path.clone(),
            msg: format!("tokenizing failed: {e}"),
        })?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

/// Packs documents into contexts of `context` tokens, each starting with `bos`.
pub struct Packer {
    docs: Documents,
    tok: Tokenizer,
    bos: u32,
    context: usize,
    /// Pre-tokenized ids must be below this.
    vocab: u32,
    stream: VecDeque<u32>,
    started: bool,
    /// Documents read ahead and tokenized, in data order: (continues the previous document,
    /// ids), or the error reading or tokenizing it, raised only when packing reaches it.
    ready: VecDeque<Result<(bool, Vec<u32>)>>,
    ended: bool,
}

/// Read-ahead bounds: enough text to keep every core tokenizing, bounded memory.
const READ_AHEAD_DOCS: usize = 1024;
const READ_AHEAD_BYTES: usize = 8 << 20;

impl Packer {
    pub fn new(docs: Documents, tok: Tokenizer, bos: u32, context: usize, vocab: u32) -> Packer {
        assert!(context >= 2, "a context holds BOS and at least one token");
        Packer {
            docs,
            tok,
            bos,
            context,
            vocab,
            stream: VecDeque::new(),
            started: false,
            ready: VecDeque::new(),
            ended: false,
        }
    }

    /// The model's tokenizer over the documents at `data` (file, directory or glob); BOS is
    /// `bos_token_id` (config.json) or the `<bos>` token. Refuses data that cannot fill one
    /// context.
    pub fn for_model(
        model_dir: &Path,
        bos_token_id: Option<u32>,
        vocab: usize,
        data: &Path,
        context: usize,
    ) -> Result<Packer> {
        let tok = Tokenizer::load(model_dir)?;
        let bos = bos_token_id
            .or_else(|| tok.token_id("<bos>"))
            .ok_or_else(|| Error::Data {
                path: model_dir.join("config.json"),
                msg: "no bos_token_id, and the tokenizer has no <bos> token".into(),
            })?;
        let mut p = Packer::new(
            Documents::new(input_files(data)?),
            tok,
            bos,
            context,
            vocab as u32,
        );
        if !p.has_context()? {
            return Err(Error::Data {
                path: data.to_path_buf(),
                msg: format!("not enough text for one context of {context} tokens"),
            });
        }
        Ok(p)
    }

    pub fn bos(&self) -> u32 {
        self.bos
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tok
    }

    /// Whether the data can fill another context (reads ahead as far as needed).
    pub fn has_context(&mut self) -> Result<bool> {
        while self.stream.len() < self.context - 1 {
            if self.ready.is_empty() && !self.read_ahead() {
                return Ok(false);
            }
            let (more, ids) = self.ready.pop_front().expect("read ahead")?;
            if ids.is_empty() {
                continue;
            }
            // A document that opens a context already follows that context's BOS.
            if self.started && !more && !self.stream.is_empty() {
                self.stream.push_back(self.bos);
            }
            self.started = true;
            self.stream.extend(ids);
        }
        Ok(true)
    }

    /// Read the next documents and tokenize them in parallel (rayon): one core tokenizing
    /// (~0.5M tokens/s) would hold up a GPU, and worker I of N packs all N workers' contexts.
    /// False at the end of the data. Errors wait in `ready` until packing reaches them, so
    /// reading ahead never fails a run that would not have needed the bad document.
    fn read_ahead(&mut self) -> bool {
        let mut docs = Vec::new();
        let mut bytes = 0;
        while !self.ended && docs.len() < READ_AHEAD_DOCS && bytes < READ_AHEAD_BYTES {
            match self.docs.next_doc() {
                Ok(Some(doc)) => {
                    bytes += match &doc {
                        Doc::Text(t) | Doc::More(t) => t.len(),
                        Doc::Ids(ids) => 4 * ids.len(),
                    };
                    docs.push(Ok((doc, self.docs.current_path())));
                }
                Ok(None) => self.ended = true,
                Err(e) => {
                    docs.push(Err(e));
                    self.ended = true;
                }
            }
        }
        if docs.is_empty() {
            return false;
        }
        let (tok, vocab, bos) = (&self.tok, self.vocab, self.bos);
        let ids: Vec<_> = docs
            .into_par_iter()
            .map(|d| d.and_then(|(doc, path)| ids_of(tok, vocab, bos, doc, path)))
            .collect();
        self.ready.extend(ids);
        true
    }

    /// The next context, or `None` when the data cannot fill another.
    pub fn next_context(&mut self) -> Result<Option<Vec<u32>>> {
        if !self.has_context()? {
            return Ok(None);
        }
        let mut c = Vec::with_capacity(self.context);
        c.push(self.bos);
        c.extend(self.stream.drain(..self.context - 1));
        Ok(Some(c))
    }
}

/// A document's ids, checked against the vocabulary, and whether it continues the
/// previous one.
fn ids_of(
    tok: &Tokenizer,
    vocab: u32,
    bos: u32,
    doc: Doc,
    path: PathBuf,
) -> Result<(bool, Vec<u32>)> {
    let more = matches!(doc, Doc::More(_));
    let ids = match doc {
        Doc::Text(t) | Doc::More(t) => {
            let ids = tok.encode(&t)?;
            // A tokenizer from another checkpoint would index past the embedding.
            if let Some(&bad) = ids.iter().find(|&&x| x >= vocab) {
                return Err(Error::Data {
                    path: tok.path.clone(),
                    msg: format!(
                        "gives token id {bad}, outside the model's vocab_size {} (config.json): a tokenizer of another model?",
                        vocab
                    ),
                });
            }
            ids
        }
        // Pre-tokenized documents often start with BOS; packing puts its own.
        Doc::Ids(mut ids) => {
            if ids.first() == Some(&bos) {
                ids.remove(0);
            }
            if let Some(&bad) = ids.iter().find(|&&x| x >= vocab) {
                return Err(Error::Data {
                    path,
                    msg: format!("token id {bad} is outside the vocabulary of {}", vocab),
                });
            }
            ids
        }
    };
    Ok((more, ids))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards() {
        assert!(wildcard("part-*.jsonl", "part-00.jsonl"));
        assert!(wildcard("*", ""));
        assert!(wildcard("a?c*", "abcdef"));
        assert!(wildcard("*.txt", "a.b.txt"));
        assert!(!wildcard("part-*.jsonl", "part-00.json"));
        assert!(!wildcard("a?c", "ac"));
    }

    #[test]
    fn jsonl_documents_and_errors_name_file_and_line() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("a.jsonl");
        std::fs::write(
            &p,
            "{\"text\": \"one\"}\n\n{\"text\": \"two\", \"x\": 1}\n{\"text\": 3}\n",
        )
        .unwrap();
        let mut d = Documents::new(vec![p.clone()]);
        assert_eq!(d.next_doc().unwrap(), Some(Doc::Text("one".into())));
        assert_eq!(d.next_doc().unwrap(), Some(Doc::Text("two".into())));
        let e = d.next_doc().unwrap_err().to_string();
        assert!(
            e.contains("a.jsonl") && e.contains("line 4") && e.contains("not a string"),
            "{e}"
        );
        std::fs::write(tmp.path().join("b.txt"), "plain").unwrap();
        std::fs::write(tmp.path().join("skip.bin"), "x").unwrap();
        let files = input_files(tmp.path()).unwrap();
        assert_eq!(files.len(), 2);
        assert_eq!(
            input_files(&tmp.path().join("*.txt")).unwrap(),
            vec![tmp.path().join("b.txt")]
        );
        assert!(input_files(&tmp.path().join("*.parquet"))
            .unwrap_err()
            .to_string()
            .contains("no file matches"));
    }

    /// A stray `.json` in a dataset directory (HF's `dataset_info.json`) is not input; a
    /// `.json` file named on its own is read as jsonl.
    #[test]
    fn directories_take_jsonl_txt_and_parquet_only() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("a.jsonl"), "{\"text\": \"one\"}\n").unwrap();
        std::fs::write(tmp.path().join("b.txt"), "plain").unwrap();
        let info = tmp.path().join("dataset_info.json");
        std::fs::write(&info, "{\"text\": \"two\"}\n").unwrap();
        assert_eq!(
            input_files(tmp.path()).unwrap(),
            vec![tmp.path().join("a.jsonl"), tmp.path().join("b.txt")]
        );
        assert_eq!(input_files(&info).unwrap(), vec![info.clone()]);
        let mut d = Documents::new(vec![info]);
        assert_eq!(d.next_doc().unwrap(), Some(Doc::Text("two".into())));
        let only_json = tempfile::tempdir().unwrap();
        std::fs::write(only_json.path().join("state.json"), "{}").unwrap();
        let e = input_files(only_json.path()).unwrap_err().to_string();
        assert!(e.ends_with("no .jsonl, .txt or .parquet files"), "{e}");
    }

    /// A parquet file with one `text` column (UTF8-annotated byte arrays) holding `rows`.
    fn write_text_parquet(path: &Path, rows: &[&[u8]]) {
        use parquet::data_type::{ByteArray, ByteArrayType};
        use parquet::file::writer::SerializedFileWriter;
        let schema = parquet::schema::parser::parse_message_type(
            "message schema { REQUIRED BYTE_ARRAY text (UTF8); }",
        )
        .unwrap();
        let f = std::fs::File::create(path).unwrap();
        let mut w = SerializedFileWriter::new(f, schema.into(), Default::default()).unwrap();
        let mut g = w.next_row_group().unwrap();
        let mut c = g.next_column().unwrap().unwrap();
        let values: Vec<ByteArray> = rows.iter().map(|r| r.to_vec().into()).collect();
        (c.typed::<ByteArrayType>())
            .write_batch(&values, None, None)
            .unwrap();
        c.close().unwrap();
        g.close().unwrap();
        w.close().unwrap();
    }

    #[test]
    fn parquet_text_that_is_not_utf8_is_a_one_line_error() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("a.parquet");
        let long_bad = [&b"x".repeat(5000)[..], b"\xff", &b"y".repeat(5000)].concat();
        write_text_parquet(&p, &["fine, naïve".as_bytes(), b"ab\xffcd", &long_bad]);
        let mut d = Documents::new(vec![p.clone()]);
        assert_eq!(d.next_doc().unwrap(), Some(Doc::Text("fine, naïve".into())));
        let e = d.next_doc().unwrap_err().to_string();
        assert_eq!(e, format!("{}: row 2: not UTF-8 (byte 2)", p.display()));
        let e = d.next_doc().unwrap_err().to_string();
        assert_eq!(e, format!("{}: row 3: not UTF-8 (byte 5000)", p.display()));
    }

    /// A long paragraph-ish text with multi-byte characters, about `bytes` long.
    fn long_text(bytes: usize) -> String {
        let mut t = String::new();
        let mut i = 0u64;
        while t.len() < bytes {
            i += 1;
            let words = 5 + (i * 7919 % 60) as usize;
            for w in 0..words {
                t.push_str(["the", "Gemma", "naïve", "licence", "fête", "x"][(w + i as usize) % 6]);
                t.push(if w % 11 == 10 { '\n' } else { ' ' });
            }
            t.push_str(if i.is_multiple_of(3) {
                "\n\n\n"
            } else {
                "\n\n"
            });
        }
        t
    }

    #[test]
    fn plain_text_is_read_in_pieces_cut_after_blank_lines() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("a.txt");
        let text = long_text(2 * TEXT_PIECE + 12345);
        std::fs::write(&p, &text).unwrap();
        let mut d = Documents::new(vec![p.clone()]);
        let mut pieces = Vec::new();
        while let Some(doc) = d.next_doc().unwrap() {
            pieces.push(doc);
        }
        assert!(pieces.len() >= 3, "{} pieces", pieces.len());
        assert!(matches!(pieces[0], Doc::Text(_)));
        let strs: Vec<&str> = (pieces.iter())
            .map(|d| match d {
                Doc::Text(s) | Doc::More(s) => s.as_str(),
                Doc::Ids(_) => unreachable!(),
            })
            .collect();
        assert!(pieces[1..].iter().all(|d| matches!(d, Doc::More(_))));
        assert_eq!(strs.concat(), text);
        for w in strs.windows(2) {
            assert!(w[0].ends_with("\n\n") && !w[1].starts_with('\n'));
            assert!(w[0].len() <= TEXT_PIECE + (1 << 16));
        }
        // No newline at all: cut between whole characters.
        let one_line = "fête naïve ".repeat(TEXT_PIECE / 5);
        std::fs::write(&p, &one_line).unwrap();
        let mut d = Documents::new(vec![p.clone()]);
        let mut got = String::new();
        while let Some(Doc::Text(s) | Doc::More(s)) = d.next_doc().unwrap() {
            got.push_str(&s);
        }
        assert_eq!(got, one_line);
        // Bad UTF-8 in a later piece names the file offset.
        let mut bytes = text.clone().into_bytes();
        let at = (TEXT_PIECE + 100..)
            .find(|&i| bytes[i - 1] < 0x80 && bytes[i] < 0x80)
            .unwrap();
        bytes[at] = 0xFF;
        std::fs::write(&p, &bytes).unwrap();
        let mut d = Documents::new(vec![p.clone()]);
        let e = loop {
            match d.next_doc() {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("bad byte not found"),
                Err(e) => break e.to_string(),
            }
        };
        assert!(
            e.contains("a.txt") && e.contains(&format!("byte {at}")),
            "{e}"
        );
    }

    /// Pieces of one file are one document: BOS starts each context and nowhere else.
    #[test]
    fn pieces_of_a_text_file_pack_as_one_document() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/gemma3");
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("a.txt");
        std::fs::write(&p, long_text(TEXT_PIECE + 5000)).unwrap();
        let tok = Tokenizer::load(&dir).unwrap();
        let bos = 2;
        let mut packer = Packer::new(Documents::new(vec![p]), tok, bos, 512, 1 << 20);
        let mut contexts = 0;
        while let Some(c) = packer.next_context().unwrap() {
            assert_eq!(c[0], bos);
            assert!(
                !c[1..].contains(&bos),
                "context {contexts} holds a BOS inside"
            );
            contexts += 1;
        }
        assert!(contexts > 100);
    }

    /// Documents that fill a context exactly (the layout of datasets pre-chunked to the
    /// model's length) pack one per context: its own BOS, no second one, nothing shifted.
    #[test]
    fn a_document_that_ends_a_context_does_not_double_the_next_bos() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/gemma3");
        let tok = Tokenizer::load(&dir).unwrap();
        let text = "Call me Ishmael. Some years ago, never mind how long precisely.";
        let ids = tok.encode(text).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("a.jsonl");
        std::fs::write(&p, format!("{{\"text\": \"{text}\"}}\n").repeat(3)).unwrap();
        let bos = 2;
        let mut packer = Packer::new(Documents::new(vec![p]), tok, bos, ids.len() + 1, 1 << 20);
        for i in 0..3 {
            let c = packer.next_context().unwrap().expect("three contexts");
            assert_eq!(c[0], bos);
            assert_eq!(&c[1..], &ids[..], "context {i}");
        }
        assert!(packer.next_context().unwrap().is_none());
    }

    /// Reading ahead tokenizes documents the run may never need; an error in one of them
    /// surfaces only when packing reaches it, as when documents were read one at a time.
    #[test]
    fn a_bad_document_past_what_is_needed_does_not_fail_the_run() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/gemma3");
        let tok = Tokenizer::load(&dir).unwrap();
        let text = "Call me Ishmael. Some years ago, never mind how long precisely.";
        let n = tok.encode(text).unwrap().len();
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("a.jsonl");
        let good = format!("{{\"text\": \"{text}\"}}\n");
        std::fs::write(&p, format!("{good}{good}{{\"text\": 3}}\n")).unwrap();
        let mut packer = Packer::new(Documents::new(vec![p]), tok, 2, n + 1, 1 << 20);
        assert!(packer.next_context().unwrap().is_some());
        assert!(packer.next_context().unwrap().is_some());
        let e = packer.next_context().unwrap_err().to_string();
        assert!(e.contains("a.jsonl") && e.contains("line 3"), "{e}");
    }

    /// With Gemma's real tokenizer (no prefix marker per input), tokenizing the pieces gives the
    /// whole file's ids. Needs DMSAE_REAL_GEMMA3=DIR (CI sets it).
    #[test]
    fn real_tokenizer_ids_of_pieces_equal_the_whole() {
        let Ok(dir) = std::env::var("DMSAE_REAL_GEMMA3") else {
            eprintln!("skipped: DMSAE_REAL_GEMMA3 is not set");
            return;
        };
        let tok = Tokenizer::load(Path::new(&dir)).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("a.txt");
        let text = long_text(2 * TEXT_PIECE + 777);
        std::fs::write(&p, &text).unwrap();
        let mut d = Documents::new(vec![p]);
        let mut ids = Vec::new();
        while let Some(Doc::Text(s) | Doc::More(s)) = d.next_doc().unwrap() {
            ids.extend(tok.encode(&s).unwrap());
        }
        assert_eq!(ids, tok.encode(&text).unwrap());
    }
}
