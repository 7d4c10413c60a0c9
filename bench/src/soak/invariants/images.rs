//! The image side of the final checks: each client's pulled images cached
//! (the cache file hashing to its SHA-256) or in pdisk (a base volume that
//! reads back its SHA-256) as last acknowledged, evicted ones gone; each
//! save ended by exactly one IMAGE_SAVED or IMAGE_SAVE_FAILED (IMAGE_SAVED
//! for an acknowledged one), the saved image present with its checksum
//! unless its client deleted it, none of a failed save; no `save-*`
//! snapshot left on pdisk.

use std::collections::BTreeMap;

use stratus_proto::agent::v1 as pb;
use stratus_proto::pdisk::v1 as pdpb;

use super::{checksum, clients, Checks};
use crate::soak::expect::{Expectations, Known};
use crate::soak::Places;

pub(super) async fn checks(
    places: &Places,
    expect: &Expectations,
    c: &mut Checks,
) -> anyhow::Result<()> {
    let (mut agent, mut pdisk) = clients(places).await?;
    let images = agent
        .list_images(pb::ListImagesRequest {})
        .await?
        .into_inner()
        .images;
    for i in &expect.images {
        let local = images
            .iter()
            .any(|m| m.location == "local" && m.sha256 == i.sha256);
        let file = places
            .agent_state
            .join("images")
            .join(format!("{}.img", i.sha256));
        match i.local {
            Known::Yes => {
                c.expect(local, || format!("pulled image {} not in the cache", i.url));
                let got = file.exists().then(|| testkit::sha256_of(&file));
                c.expect(got.as_deref() == Some(i.sha256.as_str()), || {
                    format!(
                        "cached image {} hashes to {got:?}, not {}",
                        file.display(),
                        i.sha256
                    )
                });
            }
            Known::No => c.expect(!local && !file.exists(), || {
                format!("evicted image {} still cached", i.url)
            }),
            Known::Unknown => {}
        }
        let base = images
            .iter()
            .find(|m| m.location == "pdisk" && m.sha256 == i.sha256);
        match (i.pdisk, base) {
            (Known::Yes, None) => c.expect(false, || {
                format!("image {} pulled into pdisk has no base volume", i.url)
            }),
            (Known::Yes, Some(b)) => {
                let got = checksum(&mut pdisk, &b.volume, false).await?;
                c.expect(got == i.sha256, || {
                    format!("pdisk base {} of {} reads back {got}", b.volume, i.url)
                });
            }
            (Known::No, Some(b)) => c.expect(false, || {
                format!("evicted image {} still has pdisk base {}", i.url, b.volume)
            }),
            _ => {}
        }
    }

    // Saves.
    let mut replay = Vec::new();
    let mut s = agent
        .watch_events(pb::WatchEventsRequest {
            no_follow: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    while let Some(e) = s.message().await? {
        if matches!(
            e.r#type(),
            pb::EventType::ImageSaved | pb::EventType::ImageSaveFailed
        ) {
            replay.push(e);
        }
    }
    let vols = pdisk
        .list_volumes(pdpb::ListVolumesRequest::default())
        .await?
        .into_inner()
        .volumes;
    let by_name: BTreeMap<&str, &pdpb::Volume> =
        vols.iter().map(|v| (v.name.as_str(), v)).collect();
    for save in &expect.saves {
        let target = format!("pdisk:///{}", save.name);
        let ends: Vec<&pb::Event> = replay
            .iter()
            .filter(|e| e.detail == target || e.detail.starts_with(&format!("{target}:")))
            .collect();
        if save.acknowledged {
            c.expect(
                ends.len() == 1 && ends[0].r#type() == pb::EventType::ImageSaved,
                || {
                    format!(
                        "acknowledged save {} of {} ended {:?}",
                        save.name,
                        save.guest,
                        ends.iter()
                            .map(|e| (e.r#type(), &e.detail))
                            .collect::<Vec<_>>()
                    )
                },
            );
        } else {
            c.expect(ends.len() <= 1, || {
                format!("save {} ended {} times", save.name, ends.len())
            });
        }
        let saved = ends
            .iter()
            .find(|e| e.r#type() == pb::EventType::ImageSaved);
        let volume = by_name.get(save.name.as_str());
        match saved {
            Some(e) => {
                c.expect(e.image_sha256 == save.sha256, || {
                    format!(
                        "IMAGE_SAVED of {} says {}, the disk is {}",
                        save.name, e.image_sha256, save.sha256
                    )
                });
                match (save.deleted, volume) {
                    (Known::Yes, Some(_)) => c.expect(false, || {
                        format!("saved image {} back after its delete", save.name)
                    }),
                    (Known::No, None) => {
                        c.expect(false, || format!("saved image {} missing", save.name))
                    }
                    (_, Some(v)) => {
                        let got = checksum(&mut pdisk, &save.name, false).await?;
                        c.expect(v.image_sha256 == save.sha256 && got == save.sha256, || {
                            format!(
                                "saved image {} is labelled {} and reads back {got}, the disk was {}",
                                save.name, v.image_sha256, save.sha256
                            )
                        });
                    }
                    (_, None) => {}
                }
            }
            // Failed, or never started (refused): nothing made.
            None => c.expect(volume.is_none(), || {
                format!("save {} did not succeed but left its image", save.name)
            }),
        }
    }
    let snaps = pdisk
        .list_snapshots(pdpb::ListSnapshotsRequest::default())
        .await?
        .into_inner()
        .snapshots;
    for s in &snaps {
        c.expect(!s.name.starts_with("save-"), || {
            format!(
                "save snapshot {} left on pdisk (of {})",
                s.name, s.volume_name
            )
        });
    }
    Ok(())
}
