//! LVM's JSON reports (`--reportformat json --units b --nosuffix`: every
//! value a string, sizes in bytes) parsed into [`Lv`] rows and a VG's
//! extent size: one generic document decoder, numbers parsed from strings.

use serde::Deserialize;

use crate::error::{Error, Result};

/// The fields of every `lvs` report.
pub(super) const LV_FIELDS: &str =
    "lv_name,lv_attr,lv_size,pool_lv,lv_tags,data_percent,metadata_percent,segtype";
pub(super) const VG_FIELDS: &str = "vg_name,vg_extent_size,vg_size,vg_free";

/// `{"report": [{"lv": [...]}]}` or `{"report": [{"vg": [...]}]}`.
#[derive(Deserialize)]
struct ReportDoc {
    report: Vec<ReportSection>,
}

#[derive(Deserialize)]
struct ReportSection {
    #[serde(default)]
    lv: Vec<LvRow>,
    #[serde(default)]
    vg: Vec<VgRow>,
}

#[derive(Deserialize)]
struct LvRow {
    lv_name: String,
    #[serde(default)]
    lv_attr: String,
    lv_size: String,
    #[serde(default)]
    pool_lv: String,
    #[serde(default)]
    lv_tags: String,
    #[serde(default)]
    data_percent: String,
    #[serde(default)]
    metadata_percent: String,
    #[serde(default)]
    segtype: String,
}

#[derive(Deserialize)]
struct VgRow {
    vg_name: String,
    vg_extent_size: String,
}

/// One LV as `lvs` reports it.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Lv {
    pub(super) name: String,
    pub(super) attr: String,
    pub(super) size: u64,
    pub(super) pool: String,
    pub(super) tags: Vec<String>,
    /// Thin LVs and pools: percent of the LV's size (pool: data space)
    /// mapped; None when LVM cannot tell (inactive) or for other LVs.
    pub(super) data_percent: Option<f64>,
    /// Thin pools: percent of the metadata space in use.
    pub(super) metadata_percent: Option<f64>,
    pub(super) segtype: String,
}

impl Lv {
    pub(super) fn attr_at(&self, i: usize) -> u8 {
        self.attr.as_bytes().get(i).copied().unwrap_or(b'-')
    }

    pub(super) fn active(&self) -> bool {
        self.attr_at(4) == b'a'
    }

    pub(super) fn writable(&self) -> bool {
        self.attr_at(1) == b'w'
    }

    pub(super) fn is_thin_pool(&self) -> bool {
        self.segtype == "thin-pool" || self.attr_at(0) == b't'
    }

    /// Bytes mapped, from `data_percent` (two decimals: exact to 0.01% of
    /// the LV's size); 0 when unknown.
    pub(super) fn allocated(&self) -> u64 {
        self.data_percent
            .map(|p| ((self.size as f64) * p / 100.0).round() as u64)
            .unwrap_or(0)
            .min(self.size)
    }
}

fn number(field: &str, v: &str) -> Result<u64> {
    v.trim()
        .parse()
        .map_err(|_| Error::internal(format!("LVM report: {field} {v:?} is not a number")))
}

fn percent(field: &str, v: &str) -> Result<Option<f64>> {
    let v = v.trim();
    if v.is_empty() {
        return Ok(None);
    }
    v.parse()
        .map(Some)
        .map_err(|_| Error::internal(format!("LVM report: {field} {v:?} is not a percentage")))
}

fn parse_doc(program: &str, stdout: &str) -> Result<ReportDoc> {
    serde_json::from_str(stdout)
        .map_err(|e| Error::internal(format!("{program} report not understood: {e}")))
}

pub(super) fn parse_lvs(stdout: &str) -> Result<Vec<Lv>> {
    let mut out = Vec::new();
    for row in parse_doc("lvs", stdout)?
        .report
        .into_iter()
        .flat_map(|s| s.lv)
    {
        out.push(Lv {
            size: number("lv_size", &row.lv_size)?,
            data_percent: percent("data_percent", &row.data_percent)?,
            metadata_percent: percent("metadata_percent", &row.metadata_percent)?,
            tags: row
                .lv_tags
                .split(',')
                .filter(|t| !t.is_empty())
                .map(str::to_owned)
                .collect(),
            name: row.lv_name,
            attr: row.lv_attr,
            pool: row.pool_lv,
            segtype: row.segtype,
        });
    }
    Ok(out)
}

/// The extent size of the one VG in a `vgs` report.
pub(super) fn parse_extent_size(stdout: &str, vg: &str) -> Result<u64> {
    let doc = parse_doc("vgs", stdout)?;
    let row = doc
        .report
        .iter()
        .flat_map(|s| &s.vg)
        .find(|r| r.vg_name == vg)
        .ok_or_else(|| Error::not_found(format!("volume group {vg} not found")))?;
    let e = number("vg_extent_size", &row.vg_extent_size)?;
    if !e.is_power_of_two() || e < 512 {
        return Err(Error::internal(format!(
            "volume group {vg} reports an extent size of {e} bytes"
        )));
    }
    Ok(e)
}
