//! The shim's task and process model: every task's init and execs, how they ended, exits
//! that arrive before their pid is known, and waiting for an exit. No system calls: the
//! ttrpc service drives it, the reaper feeds it exits, and it is unit-tested on its own.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;

use crate::annotations::CriuAnnotations;
use crate::config::ShimConfig;

/// How a process ended: exit status and time.
pub type Exit = (u32, Timestamp);

/// One process of a task: the init (exec id "") or an exec.
#[derive(Debug, Clone, Default)]
pub struct Proc {
    pub pid: i32,
    pub started: bool,
    pub exit: Option<Exit>,
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
    /// An exec's process.json, until it is started.
    pub spec: Option<PathBuf>,
    /// The pty master of a terminal process.
    pub master: Option<Arc<std::fs::File>>,
    /// A Start of this process is under way: its TaskExit waits for its TaskStart.
    pub starting: bool,
    /// An exit recorded while starting, not published yet.
    pub exit_held: bool,
    /// Gets pipes for all three streams (see [`crate::stdio::Streams::pipe_all`]).
    pub pipe_all: bool,
}

/// What containerd sees of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Created,
    Running,
    Paused,
    Stopped,
}

impl Proc {
    pub fn status(&self, paused: bool) -> Status {
        match (&self.exit, self.started, paused) {
            (Some(_), _, _) => Status::Stopped,
            (None, _, true) => Status::Paused,
            (None, true, _) => Status::Running,
            (None, false, _) => Status::Created,
        }
    }
}

#[derive(Debug, Default)]
pub struct Task {
    pub bundle: PathBuf,
    /// libcontainer state root of the task's namespace.
    pub root: PathBuf,
    pub config: ShimConfig,
    pub criu: CriuAnnotations,
    pub rootfs_mounted: bool,
    pub procs: HashMap<String, Proc>,
    pub paused: bool,
    /// Image directory of a task created from a checkpoint; Start restores it.
    pub checkpoint: Option<PathBuf>,
    /// Runs in a pooled sandbox, which goes back to the pool on Delete.
    pub pooled: bool,
    /// `io.trenv.ready`: what Start of the init waits for.
    pub ready: Option<crate::readiness::Ready>,
    /// `io.trenv.template`: what the task does with its template.
    pub template: Option<TemplateTask>,
    /// The task took over a spare instance, whose directory this is: Start thaws the
    /// init, Delete removes the directory.
    pub spare: Option<PathBuf>,
    /// The freezer file (and the value) that thaws the spare.
    pub spare_thaw: Option<(PathBuf, &'static str)>,
}

/// A task with `io.trenv.template`.
#[derive(Debug, Clone, Default)]
pub struct TemplateTask {
    pub plan: Option<crate::templates::Plan>,
    /// Start restores the init from the template (Create ran nothing).
    pub restore: bool,
    /// The init was restored from this template.
    pub restored: Option<String>,
    /// Build the template once the (cold) init is ready.
    pub build: bool,
    /// The sandbox's UTS namespace, for a cold create after a failed restore.
    pub sandbox_uts: Option<crate::zygote::SandboxUts>,
    /// What another instance like this one is restored from, when spares are on.
    pub spare_source: Option<Arc<crate::spares::Source>>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TaskError {
    #[error("task {0} not found")]
    TaskNotFound(String),
    #[error("process {exec:?} of {id} not found")]
    ProcNotFound { id: String, exec: String },
    #[error("task {0} already exists")]
    TaskExists(String),
    #[error("exec {0} already exists")]
    ExecExists(String),
    #[error("process {exec:?} of {id} already started")]
    AlreadyStarted { id: String, exec: String },
}

/// Exit status reported for a process deleted before it exited (it was killed), as runc's
/// shim does.
pub const DELETED_STATUS: u32 = 128 + 9;
/// Exits kept for pids not (yet) known, and for deleted processes.
const MAX_KEPT: usize = 256;

#[derive(Default)]
struct State {
    tasks: HashMap<String, Task>,
    /// Exits reaped before the pid was known (a process that ended during create/start),
    /// and exits of processes that are not tasks' (holders, loggers).
    early_exits: HashMap<i32, Exit>,
    /// How deleted processes ended, for a Wait that was blocked on one when it was deleted.
    deleted: HashMap<(String, String), Exit>,
}

/// Keeps at most MAX_KEPT entries, dropping the oldest.
fn keep_bounded<K: Clone + Eq + std::hash::Hash>(map: &mut HashMap<K, Exit>, key: K, exit: Exit) {
    if map.len() >= MAX_KEPT && !map.contains_key(&key) {
        let oldest = map
            .iter()
            .min_by_key(|(_, (_, t))| (t.seconds, t.nanos))
            .map(|(k, _)| k.clone());
        if let Some(k) = oldest {
            map.remove(&k);
        }
    }
    map.insert(key, exit);
}

fn proc_mut<'a>(st: &'a mut State, id: &str, exec_id: &str) -> Result<&'a mut Proc, TaskError> {
    st.tasks
        .get_mut(id)
        .ok_or_else(|| TaskError::TaskNotFound(id.to_string()))?
        .procs
        .get_mut(exec_id)
        .ok_or_else(|| TaskError::ProcNotFound {
            id: id.to_string(),
            exec: exec_id.to_string(),
        })
}

/// All tasks of the shim. Shared by the service's threads and the exit watcher.
#[derive(Default)]
pub struct Tasks {
    state: Mutex<State>,
    /// Signalled whenever a process exits or is deleted.
    changed: Condvar,
}

impl Tasks {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is a set of records; a panicking holder leaves none half-written that
        // matters more than refusing every later request would.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn is_empty(&self) -> bool {
        self.lock().tasks.is_empty()
    }

    pub fn contains(&self, id: &str) -> bool {
        self.lock().tasks.contains_key(id)
    }

    /// Adds a task; its init's exit, if it was reaped already, is claimed.
    pub fn insert(&self, id: &str, mut task: Task) -> Result<(), TaskError> {
        let mut st = self.lock();
        if st.tasks.contains_key(id) {
            return Err(TaskError::TaskExists(id.to_string()));
        }
        if let Some(init) = task.procs.get_mut("") {
            if init.pid != 0 && init.exit.is_none() {
                init.exit = st.early_exits.remove(&init.pid);
            }
        }
        st.tasks.insert(id.to_string(), task);
        self.changed.notify_all();
        Ok(())
    }

    /// Adds an exec (not started yet) to a task.
    pub fn insert_exec(&self, id: &str, exec_id: &str, p: Proc) -> Result<(), TaskError> {
        let mut st = self.lock();
        let task = st
            .tasks
            .get_mut(id)
            .ok_or_else(|| TaskError::TaskNotFound(id.to_string()))?;
        if task.procs.contains_key(exec_id) {
            return Err(TaskError::ExecExists(exec_id.to_string()));
        }
        task.procs.insert(exec_id.to_string(), p);
        Ok(())
    }

    /// Runs `f` on a task and one of its processes (a copy, written back afterwards).
    pub fn with_proc<T>(
        &self,
        id: &str,
        exec_id: &str,
        f: impl FnOnce(&mut Task, &mut Proc) -> T,
    ) -> Result<T, TaskError> {
        let mut st = self.lock();
        let task = st
            .tasks
            .get_mut(id)
            .ok_or_else(|| TaskError::TaskNotFound(id.to_string()))?;
        let mut p = task
            .procs
            .get(exec_id)
            .cloned()
            .ok_or_else(|| TaskError::ProcNotFound {
                id: id.to_string(),
                exec: exec_id.to_string(),
            })?;
        let out = f(task, &mut p);
        task.procs.insert(exec_id.to_string(), p);
        Ok(out)
    }

    /// Marks a Start of the process as under way: exits seen until [`Tasks::started`] or
    /// [`Tasks::start_failed`] are held, so that TaskExit follows TaskStart.
    pub fn starting(&self, id: &str, exec_id: &str) -> Result<(), TaskError> {
        let mut st = self.lock();
        let p = proc_mut(&mut st, id, exec_id)?;
        if p.started || p.starting {
            return Err(TaskError::AlreadyStarted {
                id: id.to_string(),
                exec: exec_id.to_string(),
            });
        }
        p.starting = true;
        Ok(())
    }

    /// Records that `pid` started as the process `exec_id` of `id` and claims its exit if it
    /// ended before this was known. Returns an exit that is still to be published (one that
    /// happened while the process was starting).
    pub fn started(&self, id: &str, exec_id: &str, pid: i32) -> Option<Exit> {
        let mut st = self.lock();
        let early = st.early_exits.remove(&pid);
        let p = proc_mut(&mut st, id, exec_id).ok()?;
        p.pid = pid;
        p.started = true;
        p.starting = false;
        if p.exit.is_none() && early.is_some() {
            p.exit = early;
            p.exit_held = true;
        }
        let held = std::mem::take(&mut p.exit_held)
            .then(|| p.exit.clone())
            .flatten();
        self.changed.notify_all();
        held
    }

    /// A Start failed: exits are published at once again. Returns an exit held meanwhile.
    pub fn start_failed(&self, id: &str, exec_id: &str) -> Option<Exit> {
        let mut st = self.lock();
        let p = proc_mut(&mut st, id, exec_id).ok()?;
        p.starting = false;
        std::mem::take(&mut p.exit_held)
            .then(|| p.exit.clone())
            .flatten()
    }

    /// Records the exit of `pid`; returns the (task, exec) whose TaskExit is to be published
    /// now. None when the pid is not known (yet): the exit is then kept for a later claim;
    /// or when the process is starting: its exit is held until it has started.
    pub fn exited(&self, pid: i32, exit: Exit) -> Option<(String, String)> {
        let mut st = self.lock();
        let mut known = false;
        let mut publish = None;
        for (tid, task) in st.tasks.iter_mut() {
            for (eid, p) in task.procs.iter_mut() {
                if p.pid == pid && p.exit.is_none() {
                    p.exit = Some(exit.clone());
                    known = true;
                    if p.starting {
                        p.exit_held = true;
                    } else {
                        publish = Some((tid.clone(), eid.clone()));
                    }
                }
            }
        }
        if !known {
            keep_bounded(&mut st.early_exits, pid, exit);
        }
        self.changed.notify_all();
        publish
    }

    /// The output streams (stdout, stderr as containerd named them) of the running process
    /// `pid`, if it is a task's and has no terminal.
    pub fn streams_of(&self, pid: i32) -> Option<(String, String)> {
        let st = self.lock();
        st.tasks
            .values()
            .flat_map(|t| t.procs.values())
            .find(|p| p.pid == pid && p.exit.is_none() && !p.terminal)
            .map(|p| (p.stdout.clone(), p.stderr.clone()))
    }

    /// Waits until the process has exited (or was deleted) and returns how it ended.
    pub fn wait(&self, id: &str, exec_id: &str) -> Result<Exit, TaskError> {
        let mut st = self.lock();
        let mut waited = false;
        loop {
            let p = st.tasks.get(id).and_then(|t| t.procs.get(exec_id));
            let exit = match p {
                Some(p) => p.exit.clone(),
                // Deleted while this Wait was blocked on it.
                None if waited => st
                    .deleted
                    .get(&(id.to_string(), exec_id.to_string()))
                    .cloned(),
                None => None,
            };
            if let Some(exit) = exit {
                return Ok(exit);
            }
            if p.is_none() {
                return Err(TaskError::ProcNotFound {
                    id: id.to_string(),
                    exec: exec_id.to_string(),
                });
            }
            waited = true;
            st = self
                .changed
                .wait(st)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    /// Removes a task; blocked Waits on any of its processes return. `now` is the time
    /// recorded for processes that never exited.
    pub fn remove(&self, id: &str, now: Timestamp) -> Option<Task> {
        let mut st = self.lock();
        let task = st.tasks.remove(id)?;
        for (exec_id, p) in &task.procs {
            let exit = p
                .exit
                .clone()
                .unwrap_or_else(|| (DELETED_STATUS, now.clone()));
            keep_bounded(&mut st.deleted, (id.to_string(), exec_id.clone()), exit);
        }
        self.changed.notify_all();
        Some(task)
    }

    /// Removes an exec of a task; a blocked Wait on it returns.
    pub fn remove_exec(&self, id: &str, exec_id: &str, now: Timestamp) -> Option<Proc> {
        let mut st = self.lock();
        let p = st.tasks.get_mut(id)?.procs.remove(exec_id)?;
        let exit = p.exit.clone().unwrap_or((DELETED_STATUS, now));
        keep_bounded(&mut st.deleted, (id.to_string(), exec_id.to_string()), exit);
        self.changed.notify_all();
        Some(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(seconds: i64) -> Timestamp {
        Timestamp {
            seconds,
            ..Default::default()
        }
    }

    fn task_with_init(pid: i32) -> Task {
        let mut t = Task::default();
        t.procs.insert(
            String::new(),
            Proc {
                pid,
                ..Default::default()
            },
        );
        t
    }

    /// A Wait on process `exec` of task "t", blocked in a thread of its own.
    fn wait_in_thread(
        tasks: &Arc<Tasks>,
        exec: &'static str,
    ) -> std::thread::JoinHandle<Result<Exit, TaskError>> {
        let tasks = tasks.clone();
        std::thread::spawn(move || tasks.wait("t", exec))
    }

    #[test]
    fn statuses_follow_the_life_cycle() {
        let mut p = Proc::default();
        assert_eq!(p.status(false), Status::Created);
        p.started = true;
        assert_eq!(p.status(false), Status::Running);
        assert_eq!(p.status(true), Status::Paused);
        p.exit = Some((0, at(1)));
        assert_eq!(p.status(true), Status::Stopped);
    }

    #[test]
    fn an_exit_reaped_before_create_returns_is_claimed() {
        let tasks = Tasks::default();
        assert_eq!(tasks.exited(42, (3, at(5))), None);
        tasks.insert("t", task_with_init(42)).expect("insert");
        assert_eq!(tasks.wait("t", "").expect("wait"), (3, at(5)));
    }

    #[test]
    fn an_exec_exit_before_its_pid_is_recorded_is_claimed_at_start() {
        let tasks = Tasks::default();
        tasks.insert("t", task_with_init(10)).expect("insert");
        tasks
            .insert_exec("t", "e", Proc::default())
            .expect("insert exec");
        assert_eq!(
            tasks.insert_exec("t", "e", Proc::default()),
            Err(TaskError::ExecExists("e".into()))
        );
        tasks.exited(11, (1, at(2)));
        tasks.started("t", "e", 11);
        let (status, exit) = tasks
            .with_proc("t", "e", |_, p| (p.status(false), p.exit.clone()))
            .expect("proc");
        assert_eq!((status, exit), (Status::Stopped, Some((1, at(2)))));
    }

    #[test]
    fn wait_returns_when_the_process_exits() {
        let tasks = Arc::new(Tasks::default());
        tasks.insert("t", task_with_init(7)).expect("insert");
        let waiter = wait_in_thread(&tasks, "");
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            tasks.exited(7, (0, at(9))),
            Some(("t".into(), String::new()))
        );
        assert_eq!(waiter.join().expect("join"), Ok((0, at(9))));
    }

    #[test]
    fn wait_returns_when_the_task_is_deleted_without_exiting() {
        let tasks = Arc::new(Tasks::default());
        tasks.insert("t", task_with_init(7)).expect("insert");
        let waiter = wait_in_thread(&tasks, "");
        std::thread::sleep(Duration::from_millis(50));
        assert!(tasks.remove("t", at(11)).is_some());
        assert_eq!(waiter.join().expect("join"), Ok((DELETED_STATUS, at(11))));
        // A Wait that starts after the delete finds nothing.
        assert!(matches!(
            tasks.wait("t", ""),
            Err(TaskError::ProcNotFound { .. })
        ));
    }

    #[test]
    fn wait_returns_when_an_exec_is_deleted() {
        let tasks = Arc::new(Tasks::default());
        tasks.insert("t", task_with_init(7)).expect("insert");
        tasks
            .insert_exec("t", "e", Proc::default())
            .expect("insert exec");
        let waiter = wait_in_thread(&tasks, "e");
        std::thread::sleep(Duration::from_millis(50));
        assert!(tasks.remove_exec("t", "e", at(4)).is_some());
        assert_eq!(waiter.join().expect("join"), Ok((DELETED_STATUS, at(4))));
    }

    #[test]
    fn duplicate_tasks_are_refused_and_unknown_ones_not_found() {
        let tasks = Tasks::default();
        tasks.insert("t", task_with_init(1)).expect("insert");
        assert_eq!(
            tasks.insert("t", task_with_init(2)),
            Err(TaskError::TaskExists("t".into()))
        );
        assert_eq!(
            tasks.with_proc("x", "", |_, _| ()),
            Err(TaskError::TaskNotFound("x".into()))
        );
        assert!(matches!(
            tasks.with_proc("t", "nope", |_, _| ()),
            Err(TaskError::ProcNotFound { .. })
        ));
    }

    #[test]
    fn unknown_exits_are_kept_bounded() {
        let tasks = Tasks::default();
        for pid in 0..600 {
            tasks.exited(1000 + pid, (0, at(i64::from(pid))));
        }
        let st = tasks.lock();
        assert_eq!(st.early_exits.len(), MAX_KEPT);
        // The newest are kept.
        assert!(st.early_exits.contains_key(&1599));
        assert!(!st.early_exits.contains_key(&1000));
    }
}
