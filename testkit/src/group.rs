//! A raft group of coordinator processes on 127.0.0.1 with the simulated EHR in this
//! process. Each coordinator reaches each other one through its own cuttable [`Link`], so a
//! test can isolate one; clients and workers use the coordinators' own addresses.

use std::collections::BTreeMap;
use std::time::Duration;

use fhirhaul_proto::connect::{Connector, Coordinators};
use fhirhaul_proto::v1 as pb;
use fhirhaul_proto::v1::admin_service_client::AdminServiceClient;
use fhirhaul_sim::{SimConfig, SimEhr};
use tonic::transport::Channel;

use crate::processes::{
    Link, Process, assert_completed, free_port, has_ended, sim_with_tenant, spawn_coordinator, spawn_worker,
    wait_for_job,
};

pub struct Group {
    pub sim: SimEhr,
    pub dir: tempfile::TempDir,
    pub tenant_toml: String,
    /// Each coordinator's own gRPC port.
    pub ports: BTreeMap<u64, u16>,
    /// (from, to) → the link `from` reaches `to` through.
    pub links: BTreeMap<(u64, u64), Link>,
    pub coordinators: BTreeMap<u64, Process>,
    pub workers: BTreeMap<String, Process>,
    pub lease: Option<&'static str>,
    /// Lines for the coordinators' `[cluster]` table (`snapshot_every = 20`, say).
    pub cluster_toml: String,
}

pub fn address(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

impl Group {
    /// `lease` is the coordinators' `--lease-duration` (their default when `None`).
    /// Snapshots every 20 entries, so tests exercise them.
    pub async fn start(config: SimConfig, members: u64, lease: Option<&'static str>) -> Group {
        Self::start_with(config, members, lease, "snapshot_every = 20\n", |toml| toml).await
    }

    /// [`Group::start`] with `cluster_toml` in the coordinators' `[cluster]` table and the
    /// tenant's TOML as `tenant` makes it (a benchmark's concurrency and request, say).
    pub async fn start_with(
        config: SimConfig,
        members: u64,
        lease: Option<&'static str>,
        cluster_toml: &str,
        tenant: impl FnOnce(String) -> String,
    ) -> Group {
        let dir = tempfile::tempdir().unwrap();
        let (sim, tenant_toml) = sim_with_tenant(config, dir.path()).await;
        let mut group = Group {
            sim,
            dir,
            tenant_toml: tenant(tenant_toml),
            ports: BTreeMap::new(),
            links: BTreeMap::new(),
            coordinators: BTreeMap::new(),
            workers: BTreeMap::new(),
            lease,
            cluster_toml: cluster_toml.to_string(),
        };
        for id in 1..=members {
            group.ports.insert(id, free_port());
        }
        for from in 1..=members {
            for to in 1..=members {
                if from != to {
                    group.links.insert((from, to), Link::start(group.ports[&to]).await);
                }
            }
        }
        for id in 1..=members {
            group.write_config(id, false);
            group.start_coordinator(id);
        }
        group
    }

    /// Node `id`'s configuration: its own address, and its links to the others.
    pub fn write_config(&self, id: u64, join: bool) {
        let mut toml = self.tenant_toml.clone();
        toml += &format!("[cluster]\nnode_id = {id}\njoin = {join}\n");
        toml += &self.cluster_toml;
        for (&peer, &port) in &self.ports {
            let route = match self.links.get(&(id, peer)) {
                Some(link) => address(link.port),
                None => address(port),
            };
            toml += &format!("[[cluster.coordinator]]\nid = {peer}\naddress = \"{route}\"\n");
        }
        std::fs::write(self.dir.path().join(format!("node-{id}.toml")), toml).unwrap();
    }

    pub fn start_coordinator(&mut self, id: u64) {
        let lease: Vec<&str> = self
            .lease
            .iter()
            .flat_map(|lease| ["--lease-duration", lease])
            .collect();
        let process = spawn_coordinator(
            &self.dir.path().join(format!("node-{id}.toml")),
            self.ports[&id],
            &self.dir.path().join(format!("coordinator-{id}")),
            &lease,
        );
        self.coordinators.insert(id, process);
    }

    pub fn kill(&mut self, id: u64) {
        if let Some(mut process) = self.coordinators.remove(&id) {
            process.kill_hard();
        }
    }

    pub fn addresses(&self) -> Vec<String> {
        self.ports.values().map(|port| address(*port)).collect()
    }

    pub fn start_worker(&mut self, name: &str) {
        let process = spawn_worker(
            &self.addresses().join(","),
            name,
            &self.dir.path().join("out"),
            &self.dir.path().join("workers").join(name),
            &[],
        );
        self.workers.insert(name.to_string(), process);
    }

    /// Calls that find the leader, as the CLI and workers make them.
    pub fn cluster(&self) -> Coordinators {
        Coordinators::new(&self.addresses(), Connector::default(), None).unwrap()
    }

    pub fn direct(&self, id: u64) -> Channel {
        Connector {
            timeout: Duration::from_secs(8),
            ..Connector::default()
        }
        .channel(&address(self.ports[&id]))
        .unwrap()
    }

    pub async fn status_of(&self, id: u64) -> Option<pb::ClusterStatusResponse> {
        AdminServiceClient::new(self.direct(id))
            .cluster_status(pb::ClusterStatusRequest {})
            .await
            .ok()
            .map(tonic::Response::into_inner)
    }

    /// Waits until one of `among` says it leads; returns its id.
    pub async fn leader_among(&self, among: &[u64]) -> u64 {
        for _ in 0..300 {
            for &id in among {
                if let Some(status) = self.status_of(id).await
                    && status.role == "leader"
                {
                    return id;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("no leader among {among:?}");
    }

    /// Submits the tenant's export, with one request id for every attempt the leader-
    /// finding client makes, so a retry cannot create a second job.
    pub async fn submit(&self) -> String {
        static SUBMISSIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let request_id = format!(
            "testkit-{}-{}",
            std::process::id(),
            SUBMISSIONS.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        );
        let cluster = self.cluster();
        cluster
            .call(|channel| {
                let request = cluster.request(pb::SubmitExportRequest {
                    tenant: "sim".into(),
                    request_json: String::new(),
                    incremental: false,
                    request_id: request_id.clone(),
                });
                async move { AdminServiceClient::new(channel).submit_export(request).await }
            })
            .await
            .unwrap()
            .into_inner()
            .job_id
    }

    pub async fn job(&self, job_id: &str) -> Option<pb::GetJobResponse> {
        let cluster = self.cluster().with_failover_budget(Duration::from_secs(5));
        cluster
            .call(|channel| {
                let request = cluster.request(pb::GetJobRequest {
                    job_id: job_id.into(),
                    ..Default::default()
                });
                async move { AdminServiceClient::new(channel).get_job(request).await }
            })
            .await
            .ok()
            .map(tonic::Response::into_inner)
    }

    pub async fn wait_for(
        &self,
        job_id: &str,
        what: &str,
        done: impl Fn(&pb::GetJobResponse) -> bool,
    ) -> pb::GetJobResponse {
        wait_for_job(|| self.job(job_id), what, Duration::from_secs(120), done).await
    }

    pub async fn wait_completed(&self, job_id: &str) -> pb::GetJobResponse {
        let job = self.wait_for(job_id, "the export to end", has_ended).await;
        assert_completed(&job);
        job
    }

    /// Waits until coordinator `id` has applied everything `leader` has.
    pub async fn wait_caught_up(&self, id: u64, leader: u64) -> pb::ClusterStatusResponse {
        for _ in 0..300 {
            if let (Some(status), Some(leading)) = (self.status_of(id).await, self.status_of(leader).await)
                && status.commit_index >= leading.commit_index
                && status.term == leading.term
                && status.leader_id == Some(leader.to_string())
            {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "coordinator {id} did not catch up with {leader}: {:?} vs {:?}",
            self.status_of(id).await,
            self.status_of(leader).await
        );
    }
}
