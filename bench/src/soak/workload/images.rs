//! The clients' image operations on agentd: pulls of the client's own
//! images from the soak's httpd (into the cache, or into a pdisk base too),
//! evictions, SaveImage of a stopped guest's disk, and the delete of a
//! saved base once it exists.

use stratus_proto::agent::v1 as pb;
use stratus_proto::pdisk::v1 as pdpb;
use tonic::Code;

use super::{lost, SoakClient};
use crate::soak::expect::{Known, SaveExpect, Want};

impl SoakClient {
    /// Pulls one of the client's images, into pdisk too half the time.
    pub(super) async fn pull_image(&mut self) {
        let k = self.pick(self.images.len());
        let to_pdisk = self.rng.below(2) == 0;
        let image = pb::ImageRef {
            url: self.images[k].url.clone(),
            sha256: self.images[k].sha256.clone(),
            format: pb::ImageFormat::Raw as i32,
            ..Default::default()
        };
        let request_id = self.request_id();
        let agent = self.agent.clone();
        let what = image.url.clone();
        let r = self
            .call("pull_image", &what, || {
                let mut c = agent.clone();
                let req = pb::PullImageRequest {
                    image: Some(image.clone()),
                    to_pdisk,
                    request_id: request_id.clone(),
                    ..Default::default()
                };
                async move { c.pull_image(req).await.map(drop) }
            })
            .await;
        let known = if r.is_ok() {
            Known::Yes
        } else {
            Known::Unknown
        };
        // A refused pull may still have cached the image (pdisk's import
        // failed after the download): unknown either way.
        self.images[k].local = known;
        if to_pdisk {
            self.images[k].pdisk = known;
        }
    }

    /// Evicts one of the client's images from the cache, pdisk or both.
    pub(super) async fn evict_image(&mut self) {
        let k = self.pick(self.images.len());
        let (local, pdisk) = match self.rng.below(3) {
            0 => (true, false),
            1 => (false, true),
            _ => (true, true),
        };
        let sha256 = self.images[k].sha256.clone();
        let request_id = self.request_id();
        let agent = self.agent.clone();
        let r = self
            .call("evict_image", &sha256[..12], || {
                let mut c = agent.clone();
                let req = pb::EvictImageRequest {
                    sha256: sha256.clone(),
                    local,
                    pdisk,
                    request_id: request_id.clone(),
                    ..Default::default()
                };
                async move { c.evict_image(req).await.map(drop) }
            })
            .await;
        // OK: what was asked for is gone (or was not there); NotFound:
        // nothing asked for was there. Anything else: unknown.
        let known = match &r {
            Ok(()) => Known::No,
            Err(s) if s.code() == Code::NotFound => Known::No,
            Err(_) => Known::Unknown,
        };
        if local {
            self.images[k].local = known;
        }
        if pdisk {
            self.images[k].pdisk = known;
        }
    }

    /// Saves the disk of a guest expected stopped as a new pdisk base.
    pub(super) async fn save_image(&mut self) {
        let i = self.pick_guest(|w| w == Want::Stopped);
        let guest = self.guests[i].name.clone();
        let name = self.next_name("i");
        let request_id = self.request_id();
        let agent = self.agent.clone();
        let r = self
            .call("save_image", &guest, || {
                let mut c = agent.clone();
                let req = pb::SaveImageRequest {
                    vm: guest.clone(),
                    device: "vda".into(),
                    name: name.clone(),
                    request_id: request_id.clone(),
                    ..Default::default()
                };
                async move { c.save_image(req).await.map(drop) }
            })
            .await;
        // A refusal before anything was recorded (the guest runs, was never
        // started) leaves no outcome; one after (pdisk's snapshot failed)
        // may leave IMAGE_SAVE_FAILED. Both are checked as unacknowledged.
        self.saves.push(SaveExpect {
            name,
            guest,
            acknowledged: r.is_ok(),
            sha256: self.places.image_sha.clone(),
            deleted: Known::No,
        });
    }

    /// Deletes an acknowledged save's base from pdisk, once it exists (the
    /// save finishes in the background).
    pub(super) async fn delete_saved(&mut self) {
        let fit: Vec<usize> = (0..self.saves.len())
            .filter(|&k| self.saves[k].acknowledged && self.saves[k].deleted == Known::No)
            .collect();
        if fit.is_empty() {
            return;
        }
        let k = fit[self.pick(fit.len())];
        let name = self.saves[k].name.clone();
        let pdisk = self.pdisk.clone();
        let r = self
            .call("get_saved", &name, || {
                let mut c = pdisk.clone();
                let req = pdpb::GetVolumeRequest {
                    volume: name.clone(),
                    ..Default::default()
                };
                async move { c.get_volume(req).await.map(drop) }
            })
            .await;
        if r.is_err() {
            return;
        }
        let r = self
            .call("delete_saved", &name, || {
                let mut c = pdisk.clone();
                let req = pdpb::DeleteVolumeRequest {
                    volume: name.clone(),
                    ..Default::default()
                };
                async move { c.delete_volume(req).await.map(drop) }
            })
            .await;
        match r {
            Ok(()) => self.saves[k].deleted = Known::Yes,
            Err(s) if lost(&s) || s.code() == Code::NotFound => {
                self.saves[k].deleted = Known::Unknown
            }
            Err(_) => {}
        }
    }
}
