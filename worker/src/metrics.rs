//! The worker's Prometheus metrics (`stowage_worker_*`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TaskLabels {
    pub kind: &'static str,
    /// `ok`, `retry`, `dead_letter`, `skipped`, `invalid`.
    pub outcome: &'static str,
}

/// Upper bounds of the chunks-per-document histogram.
const CHUNKS_PER_DOCUMENT_BUCKETS: [f64; 12] = [
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0,
];
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IngestLabels {
    /// `ok`, `deduplicated`, `skipped`, `replayed` (a finished request asked
    /// again), `interrupted` (parts kept for a resume), `refused`, `failed`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SearchLabels {
    /// `vector`, `keyword`, `hybrid`.
    pub mode: &'static str,
}

/// Search latency buckets: 0.5 ms to ~4 s, doubling.
fn search_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 14))
}

type SearchHistograms = Family<SearchLabels, Histogram, fn() -> Histogram>;

#[derive(Clone)]
pub struct WorkerMetrics {
    pub tasks: Family<TaskLabels, Counter>,
    pub in_flight: Gauge,
    pub bytes_uploaded: Counter,
    pub parts_uploaded: Counter,
    pub parts_resumed: Counter,
    pub part_retries: Counter,
    pub orphans_aborted: Counter,
    pub embedded_texts: Counter,
    pub embed_batches: Counter,
    /// Chunks each indexed document made (after merging and dropping).
    pub chunks_per_document: Histogram,
    /// Bytes of text extracted from documents.
    pub extracted_bytes: Counter,
    /// Bytes of documents read for extraction.
    pub extraction_input_bytes: Counter,
    /// Documents whose extraction stopped at a limit.
    pub extractions_truncated: Counter,
    /// `Search.Query` answered, from the request to the answer, by mode
    /// (the query's embedding included).
    pub search_seconds: SearchHistograms,
    /// The query's embedding alone (vector and hybrid modes).
    pub query_embedding_seconds: Histogram,
    /// `Ingest.Upload` calls by outcome.
    pub ingest_requests: Family<IngestLabels, Counter>,
    /// Bytes clients streamed (counted as received).
    pub ingest_received_bytes: Counter,
    /// Streams open now.
    pub ingest_streams: Gauge,
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        WorkerMetrics {
            tasks: Family::default(),
            in_flight: Gauge::default(),
            bytes_uploaded: Counter::default(),
            parts_uploaded: Counter::default(),
            parts_resumed: Counter::default(),
            part_retries: Counter::default(),
            orphans_aborted: Counter::default(),
            embedded_texts: Counter::default(),
            embed_batches: Counter::default(),
            chunks_per_document: Histogram::new(CHUNKS_PER_DOCUMENT_BUCKETS),
            extracted_bytes: Counter::default(),
            extraction_input_bytes: Counter::default(),
            extractions_truncated: Counter::default(),
            search_seconds: Family::new_with_constructor(search_histogram),
            query_embedding_seconds: search_histogram(),
            ingest_requests: Family::default(),
            ingest_received_bytes: Counter::default(),
            ingest_streams: Gauge::default(),
        }
    }
}

impl WorkerMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = WorkerMetrics::default();
        let r = registry.sub_registry_with_prefix("stowage_worker");
        r.register(
            "tasks",
            "Tasks finished, by kind and outcome",
            m.tasks.clone(),
        );
        r.register("in_flight", "Tasks running now", m.in_flight.clone());
        r.register(
            "uploaded_bytes",
            "Bytes sent to object storage and acknowledged",
            m.bytes_uploaded.clone(),
        );
        r.register(
            "parts_uploaded",
            "Parts (or single PUTs) stored",
            m.parts_uploaded.clone(),
        );
        r.register(
            "parts_resumed",
            "Parts taken over from an earlier attempt instead of being sent again",
            m.parts_resumed.clone(),
        );
        r.register(
            "part_retries",
            "Parts sent again after a retryable error (e.g. a checksum the server rejected)",
            m.part_retries.clone(),
        );
        r.register(
            "orphan_uploads_aborted",
            "Orphaned multipart uploads aborted by the sweeper",
            m.orphans_aborted.clone(),
        );
        r.register(
            "builtin_embedded_texts",
            "Texts the built-in model embedded for indexing",
            m.embedded_texts.clone(),
        );
        r.register(
            "builtin_embed_batches",
            "Batches the built-in model ran for indexing (texts / batches = batch size)",
            m.embed_batches.clone(),
        );
        r.register(
            "index_chunks_per_document",
            "Chunks an indexed document made",
            m.chunks_per_document.clone(),
        );
        r.register(
            "index_extracted_bytes",
            "Bytes of text extracted from documents for indexing",
            m.extracted_bytes.clone(),
        );
        r.register(
            "index_extraction_input_bytes",
            "Bytes of documents read for extraction (extracted / input = how much was text)",
            m.extraction_input_bytes.clone(),
        );
        r.register(
            "index_extractions_truncated",
            "Documents whose extraction stopped at a size, node or depth limit",
            m.extractions_truncated.clone(),
        );
        r.register(
            "search_seconds",
            "Search.Query latency by mode, the query's embedding included (successful answers)",
            m.search_seconds.clone(),
        );
        r.register(
            "query_embedding_seconds",
            "Time to embed a search query (vector and hybrid modes)",
            m.query_embedding_seconds.clone(),
        );
        r.register(
            "ingest_requests",
            "Ingest.Upload calls by outcome",
            m.ingest_requests.clone(),
        );
        r.register(
            "ingest_received_bytes",
            "Bytes clients streamed to Ingest.Upload",
            m.ingest_received_bytes.clone(),
        );
        r.register(
            "ingest_streams",
            "Ingest.Upload streams open now",
            m.ingest_streams.clone(),
        );
        m
    }

    pub fn ingest(&self, outcome: &'static str) {
        self.ingest_requests
            .get_or_create(&IngestLabels { outcome })
            .inc();
    }

    pub fn search(&self, mode: &'static str, seconds: f64) {
        self.search_seconds
            .get_or_create(&SearchLabels { mode })
            .observe(seconds);
    }

    pub fn task(&self, kind: &'static str, outcome: &'static str) {
        self.tasks
            .get_or_create(&TaskLabels { kind, outcome })
            .inc();
    }
}
