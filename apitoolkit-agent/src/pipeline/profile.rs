//! What the pipeline knows about a watched process: its framework (the payload's `sdk_type`),
//! whether a thread serves one request at a time, and its tags. Profiles are data handed in by
//! the runtime, which reads them from /proc; the pipeline itself never looks.

use std::{
    collections::HashMap,
    sync::{Arc, LazyLock},
};

use serde::{Deserialize, Serialize};

use super::routes::Routes;

/// The backend's `sdk_type` enum; serialized as the variant name, which must match exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SdkType {
    GoGin,
    GoBuiltIn,
    GoGorillaMux,
    GoFiber,
    GoDefault,
    GoOutgoing,
    PhpLaravel,
    PhpSymfony,
    JsExpress,
    JsNest,
    JsFastify,
    JsAdonis,
    JsNext,
    JavaSpringBoot,
    JsAxiosOutgoing,
    JsOutgoing,
    DotNet,
    PythonFastApi,
    PythonFlask,
    PythonDjango,
    PythonOutgoing,
    PhpSlim,
    GuzzleOutgoing,
    ElixirPhoenix,
    PythonPyramid,
    DotNetOutgoing,
    TestkitOutgoing,
    JavaSpring,
    JavaApacheOutgoing,
    JavaVertx,
    SDKUnknown,
}

impl std::str::FromStr for SdkType {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        serde_json::from_value(serde_json::Value::String(name.to_owned())).map_err(|_| {
            format!("unknown sdk_type {name:?} (use a backend enum name such as PythonFlask)")
        })
    }
}

/// How a process serves HTTP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessProfile {
    /// Best guess of the framework; `SDKUnknown` when nothing matches.
    pub sdk_type: SdkType,
    /// Each thread serves one request at a time (werkzeug, gunicorn sync and gthread, Java,
    /// Ruby …), so what a thread does belongs to the request it serves. False for event loops
    /// (node, asyncio, gevent) and for Go, whose goroutines move between threads.
    pub thread_per_request: bool,
    /// Added to every payload of the process (its pod, namespace, container and node).
    pub tags: Arc<[String]>,
    /// The service it is: its Kubernetes workload, else its command name; empty when unknown.
    pub service_name: Arc<str>,
    /// Its route templates, which turn request paths into `url_path` and `path_params`.
    pub routes: Routes,
}

impl ProcessProfile {
    /// A profile without tags.
    pub fn new(sdk_type: SdkType, thread_per_request: bool) -> Self {
        Self {
            sdk_type,
            thread_per_request,
            tags: Arc::default(),
            service_name: Arc::default(),
            routes: Routes::default(),
        }
    }

    /// A process nothing is known about: no framework, and no thread-based links guessed.
    pub fn unknown() -> Self {
        Self::new(SdkType::SDKUnknown, false)
    }

    /// The `sdk_type` of requests the process makes, from its runtime.
    pub fn outgoing_sdk_type(&self) -> SdkType {
        use SdkType::*;
        match self.sdk_type {
            PythonFlask | PythonDjango | PythonFastApi | PythonPyramid => PythonOutgoing,
            GoGin | GoBuiltIn | GoGorillaMux | GoFiber | GoDefault => GoOutgoing,
            JsExpress | JsNest | JsFastify | JsAdonis | JsNext => JsOutgoing,
            DotNet => DotNetOutgoing,
            _ => SDKUnknown,
        }
    }
}

/// The profile of a process nothing is known about, lent by [`Profiles::get`].
static UNKNOWN: LazyLock<ProcessProfile> = LazyLock::new(ProcessProfile::unknown);

/// The profiles payloads are built with.
pub enum Profiles {
    /// One per live process, added by the runtime when the pipeline names a process it has
    /// no profile for, and dropped when the process exits. Looked up for every exchange:
    /// hashed with foldhash.
    PerProcess(HashMap<u32, ProcessProfile, foldhash::fast::RandomState>),
    /// The same for every process: a replay, whose recorded processes are gone.
    Everyone(ProcessProfile),
}

impl Profiles {
    pub fn per_process() -> Self {
        Profiles::PerProcess(HashMap::default())
    }

    pub fn knows(&self, tgid: u32) -> bool {
        match self {
            Profiles::PerProcess(profiles) => profiles.contains_key(&tgid),
            Profiles::Everyone(_) => true,
        }
    }

    /// Lent, not cloned: a profile holds reference-counted tags and routes, and is looked up
    /// for every exchange.
    pub fn get(&self, tgid: u32) -> &ProcessProfile {
        match self {
            Profiles::PerProcess(profiles) => profiles.get(&tgid).unwrap_or(&UNKNOWN),
            Profiles::Everyone(profile) => profile,
        }
    }

    pub fn insert(&mut self, tgid: u32, profile: ProcessProfile) {
        if let Profiles::PerProcess(profiles) = self {
            profiles.insert(tgid, profile);
        }
    }

    pub fn forget(&mut self, tgid: u32) {
        if let Profiles::PerProcess(profiles) = self {
            profiles.remove(&tgid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(sdk_type: SdkType) -> ProcessProfile {
        ProcessProfile::new(sdk_type, false)
    }

    #[test]
    fn outgoing_types_follow_the_runtime() {
        assert_eq!(
            profile(SdkType::PythonFlask).outgoing_sdk_type(),
            SdkType::PythonOutgoing
        );
        assert_eq!(
            profile(SdkType::GoGin).outgoing_sdk_type(),
            SdkType::GoOutgoing
        );
        assert_eq!(
            profile(SdkType::SDKUnknown).outgoing_sdk_type(),
            SdkType::SDKUnknown
        );
    }

    #[test]
    fn a_process_without_a_profile_gets_no_guessed_links() {
        let mut profiles = Profiles::per_process();
        assert!(!profiles.knows(7));
        assert!(!profiles.get(7).thread_per_request);
        profiles.insert(7, profile(SdkType::PythonFlask));
        assert_eq!(profiles.get(7).sdk_type, SdkType::PythonFlask);
        profiles.forget(7);
        assert!(!profiles.knows(7));
    }
}
