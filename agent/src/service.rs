//! The gRPC face of the agent: request checking and mapping to [`Agent`] calls.

use std::sync::Arc;
use std::time::Duration;

use ferry_proto::agent::v1 as pb;
use ferry_proto::agent::v1::agent_service_server::AgentService;
use ferry_proto::tls::Identity;
use futures::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::error::AgentError;
use crate::vps::{Agent, ExecStream};

pub struct Service {
    pub agent: Arc<Agent>,
}

type R<T> = Result<Response<T>, Status>;

impl Service {
    async fn vps(&self, name: &str) -> R<pb::Vps> {
        Ok(Response::new(self.agent.get(name).await?))
    }
}

fn stop_timeout(secs: u32) -> Duration {
    if secs == 0 {
        crate::vps::DEFAULT_STOP_TIMEOUT
    } else {
        Duration::from_secs(secs as u64)
    }
}

/// Reads a gRPC byte stream from a blocking thread.
struct StreamReader {
    rx: tokio::sync::mpsc::Receiver<Result<Vec<u8>, Status>>,
    buf: Vec<u8>,
    pos: usize,
}

impl StreamReader {
    /// Reads what `stream`'s messages carry (`data` of each), in a task that
    /// forwards them; an error ends it.
    fn forward<T: Send + 'static>(
        mut stream: Streaming<T>,
        data: impl Fn(T) -> Result<Vec<u8>, Status> + Send + 'static,
    ) -> StreamReader {
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tokio::spawn(async move {
            while let Some(msg) = stream.next().await {
                let item = msg.and_then(&data);
                let stop = item.is_err();
                if tx.send(item).await.is_err() || stop {
                    return;
                }
            }
        });
        StreamReader {
            rx,
            buf: Vec::new(),
            pos: 0,
        }
    }
}

impl std::io::Read for StreamReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos >= self.buf.len() {
            match self.rx.blocking_recv() {
                None => return Ok(0),
                Some(Err(s)) => return Err(std::io::Error::other(s.message().to_string())),
                Some(Ok(b)) => {
                    self.buf = b;
                    self.pos = 0;
                }
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[tonic::async_trait]
impl AgentService for Service {
    async fn get_node(&self, _: Request<pb::GetNodeRequest>) -> R<pb::NodeInfo> {
        Ok(Response::new(self.agent.node_info()))
    }

    async fn import_template(
        &self,
        req: Request<Streaming<pb::ImportTemplateChunk>>,
    ) -> R<pb::Template> {
        let mut stream = req.into_inner();
        let header = match stream.next().await {
            Some(Ok(pb::ImportTemplateChunk {
                item: Some(pb::import_template_chunk::Item::Header(h)),
            })) => h,
            Some(Err(s)) => return Err(s),
            _ => {
                return Err(Status::invalid_argument(
                    "header: the first message must carry the template header",
                ))
            }
        };
        self.agent.check_import(&header)?;
        let reader = StreamReader::forward(stream, |msg| match msg {
            pb::ImportTemplateChunk {
                item: Some(pb::import_template_chunk::Item::Data(d)),
            } => Ok(d),
            _ => Err(Status::invalid_argument("data: only one header is allowed")),
        });
        let agent = Arc::clone(&self.agent);
        let meta = tokio::task::spawn_blocking(move || {
            agent.import_blocking(&header, reader, "upload".into())
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(meta.to_pb()))
    }

    async fn import_template_path(
        &self,
        req: Request<pb::ImportTemplatePathRequest>,
    ) -> R<pb::Template> {
        let req = req.into_inner();
        let header = req
            .header
            .ok_or_else(|| Status::invalid_argument("header: missing"))?;
        self.agent.check_import(&header)?;
        let file = self.agent.open_import_file(&req.path)?;
        let agent = Arc::clone(&self.agent);
        let meta = tokio::task::spawn_blocking(move || {
            agent.import_blocking(&header, file, req.path.clone())
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(meta.to_pb()))
    }

    async fn list_templates(
        &self,
        _: Request<pb::ListTemplatesRequest>,
    ) -> R<pb::ListTemplatesResponse> {
        let t = crate::template::list(&self.agent.paths)?;
        Ok(Response::new(pb::ListTemplatesResponse {
            templates: t.iter().map(|m| m.to_pb()).collect(),
        }))
    }

    async fn delete_template(
        &self,
        req: Request<pb::DeleteTemplateRequest>,
    ) -> R<pb::DeleteTemplateResponse> {
        self.agent.delete_template(&req.into_inner().name)?;
        Ok(Response::new(pb::DeleteTemplateResponse {}))
    }

    type ExportTemplateStream =
        futures::stream::BoxStream<'static, Result<pb::ArchiveChunk, Status>>;

    async fn export_template(
        &self,
        req: Request<pb::ExportTemplateRequest>,
    ) -> R<Self::ExportTemplateStream> {
        let name = req.into_inner().name;
        crate::spec::validate_name("name", &name)?;
        crate::template::get(&self.agent.paths, &name)?;
        let archive = self
            .agent
            .paths
            .template(&name)
            .join(crate::template::ARCHIVE_FILE);
        if !archive.is_file() {
            return Err(Status::failed_precondition(format!(
                "template {name} on this node has no archive (built in, or imported by an \
                 older agent): import it again to share it"
            )));
        }
        // The template's own archive: it stays.
        Ok(Response::new(file_stream(archive, None)))
    }

    async fn fetch_template(&self, req: Request<pb::FetchTemplateRequest>) -> R<pb::Template> {
        let r = req.into_inner();
        crate::spec::validate_name("name", &r.name)?;
        crate::spec::validate_name("from_node", &r.from_node)?;
        if r.sha256.len() != 64 || !r.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Status::invalid_argument("sha256: 64 hex digits"));
        }
        if let Ok(have) = crate::template::get(&self.agent.paths, &r.name) {
            if have.sha256 == r.sha256 {
                return Ok(Response::new(have.to_pb()));
            }
            return Err(Status::already_exists(format!(
                "template {} here is another version (sha256 {}); remove it first",
                r.name, have.sha256
            )));
        }
        let addr: ferry_proto::addr::Addr = r
            .from_addr
            .parse()
            .map_err(|e: String| Status::invalid_argument(format!("from_addr: {e}")))?;
        let ch = ferry_proto::addr::connect_node_named(&addr, &r.from_node)
            .await
            .map_err(|e| Status::unavailable(format!("node {} at {addr}: {e}", r.from_node)))?;
        let stream = ferry_proto::limits::agent_client(ch)
            .export_template(pb::ExportTemplateRequest {
                name: r.name.clone(),
            })
            .await
            .map_err(|s| Status::new(s.code(), format!("node {}: {}", r.from_node, s.message())))?
            .into_inner();
        let reader = StreamReader::forward(stream, |c| Ok(c.data));
        let agent = Arc::clone(&self.agent);
        let header = pb::ImportTemplateHeader {
            name: r.name.clone(),
            ..Default::default()
        };
        let source = format!("fetched from node {}", r.from_node);
        let meta = tokio::task::spawn_blocking(move || {
            agent.import_checked(&header, reader, source, Some(&r.sha256))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
        tracing::info!(template = %meta.name, source = %meta.source, "template fetched");
        Ok(Response::new(meta.to_pb()))
    }

    async fn create_vps(&self, req: Request<pb::CreateVpsRequest>) -> R<pb::Vps> {
        let req = req.into_inner();
        let spec = req
            .spec
            .ok_or_else(|| Status::invalid_argument("spec: missing"))?;
        let rec = self.agent.create(&spec).await?;
        if req.start {
            if let Err(e) = self.agent.start(&rec.config.name).await {
                // Created but not started: say so, and leave nothing half-made.
                let _ = self.agent.destroy(&rec.config.name, true).await;
                return Err(e.into());
            }
        }
        self.vps(&rec.config.name).await
    }

    async fn start_vps(&self, req: Request<pb::StartVpsRequest>) -> R<pb::Vps> {
        let r = req.into_inner();
        let name = r.name;
        self.agent.fence(&name, r.generation)?;
        self.agent.start(&name).await?;
        self.vps(&name).await
    }

    async fn stop_vps(&self, req: Request<pb::StopVpsRequest>) -> R<pb::Vps> {
        let r = req.into_inner();
        self.agent.fence(&r.name, r.generation)?;
        self.agent
            .stop(&r.name, stop_timeout(r.timeout_secs), r.force)
            .await?;
        self.vps(&r.name).await
    }

    async fn restart_vps(&self, req: Request<pb::StopVpsRequest>) -> R<pb::Vps> {
        let r = req.into_inner();
        self.agent.fence(&r.name, r.generation)?;
        self.agent
            .restart(&r.name, stop_timeout(r.timeout_secs), r.force)
            .await?;
        self.vps(&r.name).await
    }

    async fn destroy_vps(&self, req: Request<pb::DestroyVpsRequest>) -> R<pb::DestroyVpsResponse> {
        let r = req.into_inner();
        self.agent.fence(&r.name, r.generation)?;
        self.agent.destroy(&r.name, r.force).await?;
        Ok(Response::new(pb::DestroyVpsResponse {}))
    }

    async fn get_vps(&self, req: Request<pb::GetVpsRequest>) -> R<pb::Vps> {
        self.vps(&req.into_inner().name).await
    }

    async fn list_vps(&self, _: Request<pb::ListVpsRequest>) -> R<pb::ListVpsResponse> {
        Ok(Response::new(pb::ListVpsResponse {
            vps: self.agent.list().await,
        }))
    }

    async fn set_vps(&self, req: Request<pb::SetVpsRequest>) -> R<pb::Vps> {
        let r = req.into_inner();
        self.agent.fence(&r.name, r.generation)?;
        self.agent.set(&r).await?;
        self.vps(&r.name).await
    }

    type ExecStream = ExecStream;

    async fn exec(&self, req: Request<pb::ExecRequest>) -> R<Self::ExecStream> {
        Ok(Response::new(self.agent.exec(req.into_inner()).await?))
    }

    type CheckpointVpsStream =
        futures::stream::BoxStream<'static, Result<pb::ArchiveChunk, Status>>;

    async fn checkpoint_vps(
        &self,
        req: Request<pb::CheckpointVpsRequest>,
    ) -> R<Self::CheckpointVpsStream> {
        let r = req.into_inner();
        let archive = self
            .agent
            .checkpoint(&r.name, r.leave_running, r.generation)
            .await?;
        // A checkpoint's work dir goes once it has been sent.
        let dir = archive.parent().map(std::path::Path::to_path_buf);
        Ok(Response::new(file_stream(archive, dir)))
    }

    async fn restore_vps(&self, req: Request<Streaming<pb::ArchiveChunk>>) -> R<pb::Vps> {
        let mut stream = req.into_inner();
        let first = match stream.next().await {
            Some(Ok(c)) if !c.name.is_empty() => c,
            Some(Err(s)) => return Err(s),
            _ => {
                return Err(Status::invalid_argument(
                    "name: the first chunk must name the VPS to restore",
                ))
            }
        };
        let name = first.name.clone();
        self.agent.record(&name)?;
        let dir = self.agent.work_dir("upload")?;
        let path = dir.join("upload.ferryckpt");
        let room = self.agent.upload_room();
        let res = async {
            let mut f = tokio::fs::File::create(&path)
                .await
                .map_err(|e| AgentError::io("creating the upload file", e))?;
            use tokio::io::AsyncWriteExt;
            let mut got = 0u64;
            let mut take = |n: usize| -> Result<(), Status> {
                got += n as u64;
                if got > room.0 {
                    return Err(Status::resource_exhausted(format!(
                        "data: the archive is larger than this node takes ({} bytes: {})",
                        room.0, room.1
                    )));
                }
                Ok(())
            };
            take(first.data.len())?;
            f.write_all(&first.data)
                .await
                .map_err(|e| AgentError::io("writing the upload", e))?;
            while let Some(c) = stream.next().await {
                let c = c?;
                take(c.data.len())?;
                f.write_all(&c.data)
                    .await
                    .map_err(|e| AgentError::io("writing the upload", e))?;
            }
            f.flush()
                .await
                .map_err(|e| AgentError::io("writing the upload", e))?;
            drop(f);
            self.agent.restore_archive(&name, &path).await?;
            Ok::<_, Status>(())
        }
        .await;
        let _ = std::fs::remove_dir_all(&dir);
        res?;
        self.vps(&name).await
    }

    type MigrateVpsStream = futures::stream::BoxStream<'static, Result<pb::MigrationEvent, Status>>;

    async fn migrate_vps(&self, req: Request<pb::MigrateVpsRequest>) -> R<Self::MigrateVpsStream> {
        Ok(Response::new(
            self.agent.migrate_out(req.into_inner()).await?,
        ))
    }

    async fn migrate_prepare(
        &self,
        req: Request<pb::MigratePrepareRequest>,
    ) -> R<pb::MigratePrepareResponse> {
        let caller = req.extensions().get::<Identity>().cloned();
        Ok(Response::new(
            self.agent
                .migrate_prepare(req.into_inner(), caller.as_ref())
                .await?,
        ))
    }

    async fn migrate_push(
        &self,
        req: Request<Streaming<pb::MigrateChunk>>,
    ) -> R<pb::MigratePushResponse> {
        let caller = req.extensions().get::<Identity>().cloned();
        Ok(Response::new(
            self.agent
                .migrate_push(req.into_inner(), caller.as_ref())
                .await?,
        ))
    }

    async fn migrate_restore(
        &self,
        req: Request<pb::MigrateRestoreRequest>,
    ) -> R<pb::MigrateRestoreResponse> {
        let caller = req.extensions().get::<Identity>();
        self.agent
            .check_driver(&req.get_ref().migration_id, caller)
            .await?;
        Ok(Response::new(
            self.agent.migrate_restore(req.into_inner()).await?,
        ))
    }

    async fn migrate_finish(
        &self,
        req: Request<pb::MigrateFinishRequest>,
    ) -> R<pb::MigrateFinishResponse> {
        let caller = req.extensions().get::<Identity>();
        self.agent
            .check_driver(&req.get_ref().migration_id, caller)
            .await?;
        Ok(Response::new(
            self.agent.migrate_finish(req.into_inner()).await?,
        ))
    }

    async fn tree_digest(&self, req: Request<pb::TreeDigestRequest>) -> R<pb::TreeDigestResponse> {
        // A node may read only the tree of a migration it drives.
        if let Some(caller) = req.extensions().get::<Identity>() {
            if matches!(caller.role, ferry_proto::tls::Role::Node(_)) {
                let id = req
                    .get_ref()
                    .tree
                    .strip_prefix("incoming:")
                    .ok_or_else(|| {
                        Status::permission_denied(format!(
                            "{} may read only the tree of a migration it drives",
                            caller.role
                        ))
                    })?;
                self.agent.check_driver(id, Some(caller)).await?;
            }
        }
        Ok(Response::new(
            self.agent.tree_digest(&req.into_inner().tree).await?,
        ))
    }

    async fn read_console(
        &self,
        req: Request<pb::ReadConsoleRequest>,
    ) -> R<pb::ReadConsoleResponse> {
        let r = req.into_inner();
        Ok(Response::new(pb::ReadConsoleResponse {
            data: self.agent.console(&r.name, r.tail_bytes as usize)?,
        }))
    }
}

/// Streams a file in 1 MiB chunks, then removes its directory (a scratch dir).
/// Streams the file at `path`; then removes `remove_after` (a work dir), if
/// given.
fn file_stream(
    path: std::path::PathBuf,
    remove_after: Option<std::path::PathBuf>,
) -> futures::stream::BoxStream<'static, Result<pb::ArchiveChunk, Status>> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let res = (|| -> std::io::Result<()> {
            let mut f = std::fs::File::open(&path)?;
            loop {
                let mut buf = vec![0u8; 1 << 20];
                let n = f.read(&mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                buf.truncate(n);
                let chunk = pb::ArchiveChunk {
                    name: String::new(),
                    data: buf,
                };
                if tx.blocking_send(Ok(chunk)).is_err() {
                    return Ok(());
                }
            }
        })();
        if let Err(e) = res {
            let _ = tx.blocking_send(Err(Status::internal(format!("reading the archive: {e}"))));
        }
        if let Some(dir) = remove_after {
            let _ = std::fs::remove_dir_all(dir);
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx).boxed()
}
