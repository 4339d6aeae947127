//! Checks on the compiled descriptor set: the services and methods other
//! crates rely on exist with the right shapes, and every element of the
//! protocol is documented, as STYLE.md asks ("every field documented").

use std::collections::{BTreeMap, BTreeSet, HashMap};

use prost::Message;
use prost_types::source_code_info::Location;
use prost_types::{DescriptorProto, EnumDescriptorProto, FileDescriptorProto, FileDescriptorSet};

const PACKAGE: &str = "encore.v1";

// Field numbers of the descriptor messages, as used in SourceCodeInfo paths
// (see google/protobuf/descriptor.proto).
const FILE_MESSAGE_TYPE: i32 = 4;
const FILE_ENUM_TYPE: i32 = 5;
const FILE_SERVICE: i32 = 6;
const FILE_SYNTAX: i32 = 12;
const MESSAGE_FIELD: i32 = 2;
const MESSAGE_NESTED_TYPE: i32 = 3;
const MESSAGE_ENUM_TYPE: i32 = 4;
const MESSAGE_ONEOF_DECL: i32 = 8;
const ENUM_VALUE: i32 = 2;
const SERVICE_METHOD: i32 = 2;

fn descriptor_set() -> FileDescriptorSet {
    FileDescriptorSet::decode(encore_proto::FILE_DESCRIPTOR_SET)
        .expect("FILE_DESCRIPTOR_SET decodes as a FileDescriptorSet")
}

fn encore_files(set: &FileDescriptorSet) -> Vec<&FileDescriptorProto> {
    set.file.iter().filter(|f| f.package() == PACKAGE).collect()
}

/// The shape of one rpc, as the descriptor describes it.
#[derive(Debug, PartialEq)]
struct Method {
    name: String,
    client_streaming: bool,
    server_streaming: bool,
    input: String,
    output: String,
}

fn unary(name: &str, input: &str, output: &str) -> Method {
    Method {
        name: name.to_owned(),
        client_streaming: false,
        server_streaming: false,
        input: format!(".{PACKAGE}.{input}"),
        output: format!(".{PACKAGE}.{output}"),
    }
}

fn server_streaming(name: &str, input: &str, output: &str) -> Method {
    Method {
        server_streaming: true,
        ..unary(name, input, output)
    }
}

fn client_streaming(name: &str, input: &str, output: &str) -> Method {
    Method {
        client_streaming: true,
        ..unary(name, input, output)
    }
}

fn expected_services() -> BTreeMap<String, Vec<Method>> {
    BTreeMap::from([
        (
            "JobService".to_owned(),
            vec![
                unary("Submit", "SubmitJobRequest", "SubmitJobResponse"),
                unary("Get", "GetJobRequest", "Job"),
                unary("List", "ListJobsRequest", "ListJobsResponse"),
                unary("Cancel", "CancelJobRequest", "Job"),
                server_streaming("Watch", "WatchJobRequest", "JobEvent"),
            ],
        ),
        (
            "ClusterService".to_owned(),
            vec![
                unary("Register", "RegisterRequest", "RegisterResponse"),
                unary("Heartbeat", "HeartbeatRequest", "HeartbeatResponse"),
                unary("GetAssignment", "GetAssignmentRequest", "Assignment"),
                server_streaming("WatchAssignment", "WatchAssignmentRequest", "Assignment"),
                unary("Deregister", "DeregisterRequest", "DeregisterResponse"),
                unary(
                    "ReportProgress",
                    "ReportProgressRequest",
                    "ReportProgressResponse",
                ),
            ],
        ),
        (
            "WeightService".to_owned(),
            vec![
                client_streaming("Publish", "PublishRequest", "WeightManifest"),
                server_streaming("Fetch", "FetchRequest", "FetchResponse"),
                unary("GetManifest", "GetManifestRequest", "WeightManifest"),
                unary(
                    "ListVersions",
                    "ListVersionsRequest",
                    "ListVersionsResponse",
                ),
            ],
        ),
        (
            "PreferenceService".to_owned(),
            vec![
                unary("StartSession", "StartSessionRequest", "RaterSession"),
                unary("GetPair", "GetPairRequest", "ClipPair"),
                unary(
                    "SubmitComparisons",
                    "SubmitComparisonsRequest",
                    "SubmitComparisonsResponse",
                ),
            ],
        ),
        (
            "RolloutQueueService".to_owned(),
            vec![
                unary("Append", "QueueAppendRequest", "QueueAppendResponse"),
                unary("Read", "QueueReadRequest", "QueueEntries"),
                unary("Ack", "QueueAckRequest", "QueueAckResponse"),
                unary("ClaimStale", "QueueClaimRequest", "QueueEntries"),
                unary("Stats", "QueueStatsRequest", "QueueStats"),
            ],
        ),
        (
            "RewardService".to_owned(),
            vec![
                unary("Score", "ScoreRequest", "ScoreResponse"),
                unary(
                    "DescribeModels",
                    "DescribeModelsRequest",
                    "DescribeModelsResponse",
                ),
            ],
        ),
    ])
}

#[test]
fn descriptor_set_holds_the_encore_files_and_their_imports() {
    let set = descriptor_set();
    let names: BTreeSet<&str> = encore_files(&set).iter().map(|f| f.name()).collect();
    assert_eq!(
        names,
        BTreeSet::from([
            "encore/v1/cluster.proto",
            "encore/v1/common.proto",
            "encore/v1/job.proto",
            "encore/v1/preferences.proto",
            "encore/v1/queue.proto",
            "encore/v1/reward.proto",
            "encore/v1/rollout.proto",
            "encore/v1/weights.proto",
        ])
    );
    // Self-contained for reflection: every import is in the set too.
    let all: BTreeSet<&str> = set.file.iter().map(|f| f.name()).collect();
    for file in &set.file {
        for dep in &file.dependency {
            assert!(
                all.contains(dep.as_str()),
                "{} imports {dep}, which is missing",
                file.name()
            );
        }
    }
    for file in encore_files(&set) {
        assert_eq!(file.syntax(), "proto3", "{}", file.name());
    }
}

#[test]
fn services_have_the_expected_methods_and_streaming_shapes() {
    let set = descriptor_set();
    let mut found = BTreeMap::new();
    for file in encore_files(&set) {
        for service in &file.service {
            let methods: Vec<Method> = service
                .method
                .iter()
                .map(|m| Method {
                    name: m.name().to_owned(),
                    client_streaming: m.client_streaming(),
                    server_streaming: m.server_streaming(),
                    input: m.input_type().to_owned(),
                    output: m.output_type().to_owned(),
                })
                .collect();
            found.insert(service.name().to_owned(), methods);
        }
    }
    assert_eq!(found, expected_services());
}

/// Comments attached to each SourceCodeInfo path of a file.
fn locations(file: &FileDescriptorProto) -> HashMap<Vec<i32>, &Location> {
    let info = file
        .source_code_info
        .as_ref()
        .unwrap_or_else(|| panic!("{} has no source info; build.rs must keep it", file.name()));
    info.location.iter().map(|l| (l.path.clone(), l)).collect()
}

struct DocCheck<'a> {
    file: &'a str,
    locations: HashMap<Vec<i32>, &'a Location>,
    missing: Vec<String>,
}

impl DocCheck<'_> {
    fn require(&mut self, path: &[i32], what: String) {
        let documented = self
            .locations
            .get(path)
            .and_then(|l| l.leading_comments.as_deref())
            .is_some_and(|c| !c.trim().is_empty());
        if !documented {
            self.missing.push(format!("{}: {what}", self.file));
        }
    }

    fn message(&mut self, path: Vec<i32>, scope: &str, message: &DescriptorProto) {
        // Map fields compile to synthetic *Entry messages that have no source.
        if message.options.as_ref().is_some_and(|o| o.map_entry()) {
            return;
        }
        let name = format!("{scope}.{}", message.name());
        self.require(&path, format!("message {name}"));
        for (i, field) in message.field.iter().enumerate() {
            self.require(
                &[&path[..], &[MESSAGE_FIELD, i as i32]].concat(),
                format!("field {name}.{}", field.name()),
            );
        }
        for (i, oneof) in message.oneof_decl.iter().enumerate() {
            // `optional` fields get synthetic oneofs; the field's own comment covers them.
            let synthetic = message
                .field
                .iter()
                .any(|f| f.proto3_optional() && f.oneof_index == Some(i as i32));
            if !synthetic {
                self.require(
                    &[&path[..], &[MESSAGE_ONEOF_DECL, i as i32]].concat(),
                    format!("oneof {name}.{}", oneof.name()),
                );
            }
        }
        for (i, nested) in message.nested_type.iter().enumerate() {
            self.message(
                [&path[..], &[MESSAGE_NESTED_TYPE, i as i32]].concat(),
                &name,
                nested,
            );
        }
        for (i, nested) in message.enum_type.iter().enumerate() {
            self.enumeration(
                [&path[..], &[MESSAGE_ENUM_TYPE, i as i32]].concat(),
                &name,
                nested,
            );
        }
    }

    fn enumeration(&mut self, path: Vec<i32>, scope: &str, enumeration: &EnumDescriptorProto) {
        let name = format!("{scope}.{}", enumeration.name());
        self.require(&path, format!("enum {name}"));
        for (i, value) in enumeration.value.iter().enumerate() {
            self.require(
                &[&path[..], &[ENUM_VALUE, i as i32]].concat(),
                format!("enum value {}", value.name()),
            );
        }
    }
}

#[test]
fn every_message_field_enum_value_service_and_rpc_is_documented() {
    let set = descriptor_set();
    let mut missing = Vec::new();
    let mut checked = 0;
    for file in encore_files(&set) {
        let mut check = DocCheck {
            file: file.name(),
            locations: locations(file),
            missing: Vec::new(),
        };
        for (i, message) in file.message_type.iter().enumerate() {
            check.message(vec![FILE_MESSAGE_TYPE, i as i32], PACKAGE, message);
        }
        for (i, enumeration) in file.enum_type.iter().enumerate() {
            check.enumeration(vec![FILE_ENUM_TYPE, i as i32], PACKAGE, enumeration);
        }
        for (i, service) in file.service.iter().enumerate() {
            check.require(
                &[FILE_SERVICE, i as i32],
                format!("service {}", service.name()),
            );
            for (j, method) in service.method.iter().enumerate() {
                check.require(
                    &[FILE_SERVICE, i as i32, SERVICE_METHOD, j as i32],
                    format!("rpc {}.{}", service.name(), method.name()),
                );
            }
        }
        checked += check.locations.len();
        missing.extend(check.missing);
    }
    assert!(
        checked > 100,
        "source info looks empty ({checked} locations)"
    );
    assert!(
        missing.is_empty(),
        "undocumented protocol elements:\n{}",
        missing.join("\n")
    );
}

#[test]
fn every_file_has_a_header_saying_who_speaks_it() {
    let set = descriptor_set();
    for file in encore_files(&set) {
        let locations = locations(file);
        let header = locations
            .get(&vec![FILE_SYNTAX])
            .map(|l| {
                let mut text = l.leading_detached_comments.join("\n");
                text.push_str(l.leading_comments());
                text
            })
            .unwrap_or_default();
        assert!(
            header.contains("Spoken by:"),
            "{} lacks a header comment with \"Spoken by:\"",
            file.name()
        );
    }
}

#[test]
fn enums_follow_the_naming_and_zero_value_conventions() {
    fn screaming_snake(camel: &str) -> String {
        let mut out = String::new();
        for (i, c) in camel.chars().enumerate() {
            if c.is_ascii_uppercase() && i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_uppercase());
        }
        out
    }
    fn check(enumeration: &EnumDescriptorProto) {
        let prefix = format!("{}_", screaming_snake(enumeration.name()));
        let zero = enumeration.value.iter().find(|v| v.number() == 0);
        assert_eq!(
            zero.map(|v| v.name().to_owned()),
            Some(format!("{prefix}UNSPECIFIED")),
            "zero value of {}",
            enumeration.name()
        );
        for value in &enumeration.value {
            assert!(
                value.name().starts_with(&prefix),
                "{} lacks the prefix {prefix}",
                value.name()
            );
        }
    }
    fn walk(message: &DescriptorProto) {
        message.enum_type.iter().for_each(check);
        message.nested_type.iter().for_each(walk);
    }
    let set = descriptor_set();
    for file in encore_files(&set) {
        file.enum_type.iter().for_each(check);
        file.message_type.iter().for_each(walk);
    }
}
