//! Kubernetes metadata for watched processes: the pod and container a process runs in (read
//! from its cgroup path) named through the API server with the pod's service account. Gives
//! payloads their pod, namespace, container and node tags, and lets `--k8s-namespace` and
//! `--k8s-label` select processes.

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
    sync::{Arc, RwLock},
    time::Duration,
};

use serde::Deserialize;

const SERVICE_ACCOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    #[error("reading the service account: {0}")]
    ServiceAccount(std::io::Error),
    #[error("Kubernetes API: {0}")]
    Http(#[from] reqwest::Error),
    #[error("Kubernetes API answered {0}")]
    Status(reqwest::StatusCode),
    #[error("Kubernetes API sent an unreadable pod list: {0}")]
    Decode(#[from] serde_json::Error),
}

/// The pods the API server lists, refreshed in the background; empty outside Kubernetes.
pub type SharedPods = Arc<RwLock<PodIndex>>;

/// The pod and container a process runs in, as its cgroup path names them.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PodRef {
    pub pod_uid: String,
    pub container_id: String,
}

fn is_hex_id(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|byte| byte.is_ascii_hexdigit())
}

/// Finds the pod UID and container id in /proc/<pid>/cgroup text. The kubelet's cgroupfs
/// driver writes `…/kubepods/<qos>/pod<uid>/<id>`, the systemd driver
/// `…/kubepods-<qos>-pod<uid_with_underscores>.slice/<runtime>-<id>.scope`.
pub fn pod_of_cgroup(cgroup: &str) -> Option<PodRef> {
    cgroup.lines().find_map(|line| {
        let path = line.splitn(3, ':').nth(2)?;
        let mut segments = path.split('/').filter(|segment| !segment.is_empty());
        let pod = segments.find_map(|segment| {
            let name = segment.strip_suffix(".slice").unwrap_or(segment);
            let uid = name.rsplit_once("pod").map(|(_, uid)| uid)?;
            (name.starts_with("pod") || name.starts_with("kubepods"))
                .then(|| uid.replace('_', "-"))
                .filter(|uid| uid.len() == 36)
        })?;
        let container = segments.find_map(|segment| {
            let id = segment.strip_suffix(".scope").unwrap_or(segment);
            let id = id.rsplit_once('-').map_or(id, |(_, id)| id);
            is_hex_id(id).then(|| id.to_owned())
        })?;
        Some(PodRef {
            pod_uid: pod,
            container_id: container,
        })
    })
}

#[derive(Deserialize)]
struct PodList {
    items: Vec<Pod>,
}

#[derive(Deserialize)]
struct Pod {
    metadata: PodMetadata,
    #[serde(default)]
    spec: PodSpec,
    #[serde(default)]
    status: PodStatus,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodMetadata {
    name: String,
    namespace: String,
    uid: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    owner_references: Vec<OwnerReference>,
}

#[derive(Deserialize)]
struct OwnerReference {
    kind: String,
    name: String,
}

/// The workload a pod belongs to: a Deployment's name is its ReplicaSet's without the
/// pod-template hash; a StatefulSet, DaemonSet or Job names itself; a bare pod is its own.
fn workload_name(pod_name: &str, owners: &[OwnerReference]) -> String {
    match owners.first() {
        Some(owner) if owner.kind == "ReplicaSet" => owner
            .name
            .rsplit_once('-')
            .map_or(owner.name.as_str(), |(deployment, _)| deployment)
            .to_owned(),
        Some(owner) => owner.name.clone(),
        None => pod_name.to_owned(),
    }
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodSpec {
    #[serde(default)]
    node_name: String,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodStatus {
    #[serde(default)]
    container_statuses: Vec<ContainerStatus>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ContainerStatus {
    name: String,
    /// `containerd://<id>`, `cri-o://<id>`, `docker://<id>`.
    #[serde(default, rename = "containerID")]
    container_id: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub name: String,
    /// Its Deployment, StatefulSet, DaemonSet or Job (the pod's own name when it has none).
    pub workload: String,
    pub namespace: String,
    pub node: String,
    pub labels: BTreeMap<String, String>,
    /// Container names by runtime id.
    pub containers: HashMap<String, String>,
}

/// The pods the API server listed, by UID.
#[derive(Clone, Debug, Default)]
pub struct PodIndex {
    pods: HashMap<String, PodInfo>,
}

impl PodIndex {
    pub fn from_pod_list(json: &[u8]) -> Result<Self, serde_json::Error> {
        let list: PodList = serde_json::from_slice(json)?;
        let pods = list
            .items
            .into_iter()
            .map(|pod| {
                let containers = pod
                    .status
                    .container_statuses
                    .into_iter()
                    .filter_map(|status| {
                        let (_, id) = status.container_id.split_once("://")?;
                        Some((id.to_owned(), status.name))
                    })
                    .collect();
                let info = PodInfo {
                    workload: workload_name(&pod.metadata.name, &pod.metadata.owner_references),
                    name: pod.metadata.name,
                    namespace: pod.metadata.namespace,
                    node: pod.spec.node_name,
                    labels: pod.metadata.labels,
                    containers,
                };
                (pod.metadata.uid, info)
            })
            .collect();
        Ok(Self { pods })
    }

    pub fn pod(&self, pod: &PodRef) -> Option<&PodInfo> {
        self.pods.get(&pod.pod_uid)
    }

    /// `k8s.namespace:…`, `k8s.pod:…`, `k8s.container:…`, `k8s.node:…` for a known pod.
    pub fn tags(&self, pod: &PodRef) -> Vec<String> {
        let Some(info) = self.pod(pod) else {
            return Vec::new();
        };
        let mut tags = vec![
            format!("k8s.namespace:{}", info.namespace),
            format!("k8s.pod:{}", info.name),
        ];
        if let Some(container) = info.containers.get(&pod.container_id) {
            tags.push(format!("k8s.container:{container}"));
        }
        if !info.node.is_empty() {
            tags.push(format!("k8s.node:{}", info.node));
        }
        tags
    }
}

/// Which pods `--k8s-namespace` and `--k8s-label key=value` select (all of the given ones
/// must match).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodSelector {
    pub namespaces: Vec<String>,
    pub labels: Vec<(String, String)>,
}

impl PodSelector {
    pub fn is_empty(&self) -> bool {
        self.namespaces.is_empty() && self.labels.is_empty()
    }

    pub fn matches(&self, pod: &PodInfo) -> bool {
        !self.is_empty()
            && (self.namespaces.is_empty() || self.namespaces.contains(&pod.namespace))
            && self
                .labels
                .iter()
                .all(|(key, value)| pod.labels.get(key) == Some(value))
    }
}

/// The pod of a process, from its cgroup.
pub fn pod_of_process(pid: u32) -> Option<PodRef> {
    pod_of_cgroup(&std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?)
}

/// The API server, as a pod's service account reaches it.
pub struct ApiClient {
    base_url: String,
    token: String,
    client: reqwest::Client,
}

impl ApiClient {
    pub fn new(
        base_url: String,
        token: String,
        ca_pem: Option<&[u8]>,
    ) -> Result<Self, KubernetesError> {
        let mut builder = reqwest::Client::builder().timeout(REQUEST_TIMEOUT);
        if let Some(pem) = ca_pem {
            builder = builder.add_root_certificate(reqwest::Certificate::from_pem(pem)?);
        }
        Ok(Self {
            base_url,
            token,
            client: builder.build()?,
        })
    }

    /// The client of the pod the agent runs in, or `None` outside Kubernetes.
    pub fn in_cluster() -> Option<Result<Self, KubernetesError>> {
        let host = std::env::var("KUBERNETES_SERVICE_HOST").ok()?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
        let account = Path::new(SERVICE_ACCOUNT);
        let read = |file: &str| std::fs::read(account.join(file));
        Some((|| {
            let token =
                String::from_utf8_lossy(&read("token").map_err(KubernetesError::ServiceAccount)?)
                    .trim()
                    .to_owned();
            let ca = read("ca.crt").map_err(KubernetesError::ServiceAccount)?;
            let host = if host.contains(':') {
                format!("[{host}]")
            } else {
                host
            };
            Self::new(format!("https://{host}:{port}"), token, Some(&ca))
        })())
    }

    /// The pods scheduled on `node` (every pod when the node is unknown).
    pub async fn pods(&self, node: Option<&str>) -> Result<PodIndex, KubernetesError> {
        let mut request = self
            .client
            .get(format!("{}/api/v1/pods", self.base_url))
            .bearer_auth(&self.token);
        if let Some(node) = node {
            request = request.query(&[("fieldSelector", format!("spec.nodeName={node}"))]);
        }
        let response = request.send().await?;
        if !response.status().is_success() {
            return Err(KubernetesError::Status(response.status()));
        }
        let body = response.bytes().await?;
        Ok(PodIndex::from_pod_list(&body)?)
    }
}

/// How often the pod list is fetched again (new pods, new containers).
const REFRESH: Duration = Duration::from_secs(30);

impl ApiClient {
    /// Replaces `pods` with the node's pods every `REFRESH`; a failed fetch keeps the last
    /// list.
    pub async fn keep_fresh(self, node: Option<String>, pods: SharedPods) {
        loop {
            tokio::time::sleep(REFRESH).await;
            match self.pods(node.as_deref()).await {
                Ok(index) => {
                    if let Ok(mut shared) = pods.write() {
                        *shared = index;
                    }
                }
                Err(error) => tracing::warn!(%error, "could not list pods; keeping the last list"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONTAINER: &str = "8d3b2c1a8d3b2c1a8d3b2c1a8d3b2c1a8d3b2c1a8d3b2c1a8d3b2c1a8d3b2c1a";
    const UID: &str = "0c6f7a10-2b1e-4c3d-9f8e-7a6b5c4d3e2f";

    fn pod_list() -> String {
        format!(
            r#"{{"kind":"PodList","items":[{{
                "metadata":{{"name":"shop-7d9f","namespace":"prod","uid":"{UID}",
                             "labels":{{"app":"shop","tier":"web"}},
                             "ownerReferences":[{{"kind":"ReplicaSet","name":"shop-5d8f7c9b4"}}]}},
                "spec":{{"nodeName":"node-a"}},
                "status":{{"containerStatuses":[
                    {{"name":"web","containerID":"containerd://{CONTAINER}"}},
                    {{"name":"sidecar","containerID":"containerd://{}"}}]}}}}]}}"#,
            "f".repeat(64)
        )
    }

    #[test]
    fn pods_are_found_in_both_cgroup_driver_layouts() {
        let expected = Some(PodRef {
            pod_uid: UID.into(),
            container_id: CONTAINER.into(),
        });
        let cgroupfs = format!("0::/kubepods/burstable/pod{UID}/{CONTAINER}\n");
        assert_eq!(pod_of_cgroup(&cgroupfs), expected);
        let systemd = format!(
            "12:memory:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{CONTAINER}.scope\n",
            UID.replace('-', "_")
        );
        assert_eq!(pod_of_cgroup(&systemd), expected);
        assert_eq!(pod_of_cgroup("0::/system.slice/nginx.service\n"), None);
        assert_eq!(pod_of_cgroup("0::/\n"), None);
    }

    #[test]
    fn a_pod_gives_its_tags_and_matches_selectors() {
        let index = PodIndex::from_pod_list(pod_list().as_bytes()).unwrap();
        let pod = PodRef {
            pod_uid: UID.into(),
            container_id: CONTAINER.into(),
        };
        assert_eq!(
            index.tags(&pod),
            [
                "k8s.namespace:prod",
                "k8s.pod:shop-7d9f",
                "k8s.container:web",
                "k8s.node:node-a"
            ]
        );
        let info = index.pod(&pod).unwrap();
        assert_eq!(info.workload, "shop");
        let selector = |namespaces: &[&str], labels: &[(&str, &str)]| PodSelector {
            namespaces: namespaces.iter().map(|n| n.to_string()).collect(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        assert!(selector(&["prod"], &[]).matches(info));
        assert!(selector(&[], &[("app", "shop"), ("tier", "web")]).matches(info));
        assert!(!selector(&["prod"], &[("app", "cart")]).matches(info));
        assert!(!selector(&[], &[]).matches(info));
        let unknown = PodRef {
            pod_uid: "other".into(),
            container_id: CONTAINER.into(),
        };
        assert!(index.tags(&unknown).is_empty());
    }

    /// A stand-in API server on a local socket (plain HTTP: the CA path is reqwest's own).
    #[tokio::test]
    async fn the_client_lists_the_node_s_pods_with_its_token() {
        use tokio::{
            io::{AsyncReadExt as _, AsyncWriteExt as _},
            net::TcpListener,
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let body = pod_list();
        let server = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = vec![0u8; 4096];
            let read = stream.read(&mut request).await.unwrap();
            let request = String::from_utf8_lossy(&request[..read]).into_owned();
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            stream.write_all(response.as_bytes()).await.unwrap();
            request
        });
        let client = ApiClient::new(format!("http://{address}"), "sa-token".into(), None).unwrap();
        let index = client.pods(Some("node-a")).await.unwrap();
        let request = server.await.unwrap();
        assert!(
            request.starts_with("GET /api/v1/pods?fieldSelector=spec.nodeName%3Dnode-a HTTP/1.1"),
            "{request}"
        );
        assert!(
            request
                .to_ascii_lowercase()
                .contains("authorization: bearer sa-token")
        );
        assert_eq!(index.pods.len(), 1);
    }
}
