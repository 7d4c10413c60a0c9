//! Plain-text layout for human output: aligned columns and aligned
//! `key: value` blocks. No colours and no trailing spaces, so the output
//! survives `grep`, `awk` and copy-paste.

/// Rows of cells printed under a header, each column as wide as its widest cell.
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

/// Columns are separated by this many spaces.
const GAP: usize = 2;

impl Table {
    pub fn new<I, S>(header: I) -> Table
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Table {
            header: header.into_iter().map(Into::into).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells print empty, extra cells are kept.
    pub fn row<I, S>(&mut self, cells: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.rows.push(cells.into_iter().map(Into::into).collect());
    }

    /// The table as lines ending in `\n`; just the header when there are no rows.
    pub fn render(&self) -> String {
        let lines: Vec<&Vec<String>> = std::iter::once(&self.header).chain(&self.rows).collect();
        let columns = lines.iter().map(|l| l.len()).max().unwrap_or(0);
        let mut widths = vec![0; columns];
        for line in &lines {
            for (w, cell) in widths.iter_mut().zip(line.iter()) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for line in lines {
            let mut text = String::new();
            for (i, width) in widths.iter().enumerate() {
                let cell = line.get(i).map(String::as_str).unwrap_or("");
                text.push_str(cell);
                let pad = width - cell.chars().count() + GAP;
                text.extend(std::iter::repeat_n(' ', pad));
            }
            out.push_str(text.trim_end());
            out.push('\n');
        }
        out
    }
}

/// `key: value` lines with the values aligned in one column.
pub fn fields(pairs: &[(&str, String)]) -> String {
    let width = pairs
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for (key, value) in pairs {
        let line = format!("{:<w$}  {value}", format!("{key}:"), w = width + 1);
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_on_the_widest_cell() {
        let mut t = Table::new(["NAME", "SIZE", "STATE"]);
        t.row(["db1", "10G", "ready"]);
        t.row(["a-much-longer-name", "512M", "creating"]);
        assert_eq!(
            t.render(),
            "NAME                SIZE  STATE\n\
             db1                 10G   ready\n\
             a-much-longer-name  512M  creating\n"
        );
    }

    #[test]
    fn empty_cells_and_short_rows_leave_no_trailing_spaces() {
        let mut t = Table::new(["A", "B"]);
        t.row(["x"]);
        t.row(["", "y"]);
        assert_eq!(t.render(), "A  B\nx\n   y\n");
    }

    #[test]
    fn empty_table_prints_its_header() {
        assert_eq!(Table::new(["NAME", "UUID"]).render(), "NAME  UUID\n");
    }

    #[test]
    fn width_counts_characters_not_bytes() {
        let mut t = Table::new(["K", "V"]);
        t.row(["é", "1"]);
        assert_eq!(t.render(), "K  V\né  1\n");
    }

    #[test]
    fn fields_align_values() {
        let out = fields(&[
            ("name", "db1".into()),
            ("allocated", "1G".into()),
            ("labels", "".into()),
        ]);
        assert_eq!(out, "name:       db1\nallocated:  1G\nlabels:\n");
    }
}
