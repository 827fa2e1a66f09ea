//! The route templates of a watched process, read from its application source: the files its
//! command line names, resolved against its working directory, and the application modules
//! they import, all through `/proc/<pid>/root` so a container's files are read.

pub mod django;
pub mod javascript;
mod mounts;
pub mod python;
mod syntax;

use std::{
    collections::HashSet,
    fs,
    path::{Path, PathBuf},
};

use crate::pipeline::{
    profile::SdkType,
    routes::{RouteTable, Template},
};
use mounts::Scanned;
use python::Module;

/// Bounds on what one scan reads, so a huge tree cannot stall profiling.
const MAX_MODULES: usize = 400;
const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// The entry points of a Python process: `(directory the module path starts from, module
/// name)`, from `app.py`, `module:app` (gunicorn, uvicorn; under `--app-dir`/`--chdir` when
/// given), `--app module` and `FLASK_APP`.
fn python_entries(args: &[String], flask_app: Option<&str>, cwd: &Path) -> Vec<(PathBuf, String)> {
    let app_dir = args
        .windows(2)
        .find(|pair| pair[0] == "--app-dir" || pair[0] == "--chdir")
        .map_or_else(|| cwd.to_path_buf(), |pair| cwd.join(&pair[1]));
    let mut entries = Vec::new();
    let mut previous = "";
    let module_of = |target: &str| {
        let module = target.split_once(':').map_or(target, |(module, _)| module);
        let module = module.trim_end_matches(".py").replace('/', ".");
        // Each dotted part an identifier: `0.0.0.0:80` (a bind address) is no module.
        module
            .split('.')
            .all(|part| {
                part.starts_with(|c: char| c.is_alphabetic() || c == '_')
                    && part.chars().all(|c| c.is_alphanumeric() || c == '_')
            })
            .then_some(module)
    };
    for arg in args.iter().skip(1) {
        if let Some(script) = arg.strip_suffix(".py") {
            let path = cwd.join(script);
            let directory = path.parent().unwrap_or(cwd).to_path_buf();
            let name = path
                .file_name()
                .map(|name| name.to_string_lossy().into_owned())
                .unwrap_or_default();
            entries.push((directory, name));
        } else if previous == "--app" || arg.contains(':') && !arg.starts_with('-') {
            if let Some(module) = module_of(arg) {
                entries.push((app_dir.clone(), module));
            }
        } else if let Some(target) = arg.strip_prefix("--app=")
            && let Some(module) = module_of(target)
        {
            entries.push((cwd.to_path_buf(), module));
        }
        previous = arg;
    }
    if let Some(module) = flask_app.and_then(module_of) {
        entries.push((cwd.to_path_buf(), module));
    }
    entries
}

/// The application's JavaScript files: the scripts the command line names and the files they
/// require or import, relative to the first script's directory.
fn javascript_modules(root: &Path, args: &[String], cwd: &Path) -> Vec<javascript::Module> {
    let scripts: Vec<PathBuf> = args
        .iter()
        .skip(1)
        .filter(|arg| {
            [".js", ".cjs", ".mjs"]
                .iter()
                .any(|suffix| arg.ends_with(suffix))
        })
        .map(|arg| cwd.join(arg))
        .collect();
    let Some(base) = scripts.first().and_then(|script| script.parent()) else {
        return Vec::new();
    };
    let base = root.join(base.strip_prefix("/").unwrap_or(base));
    let exists = |name: &str| base.join(name).is_file();
    let scripts = scripts
        .iter()
        .filter_map(|script| Some(script.file_name()?.to_string_lossy().into_owned()))
        .collect();
    walk_modules(scripts, |name| {
        let module = javascript::Module {
            name: name.to_owned(),
            source: read_source(&base.join(name))?,
        };
        let imported = javascript::imported_specifiers(&module)
            .iter()
            .filter_map(|specifier| javascript::resolve_specifier(&module.name, specifier, &exists))
            .collect();
        Some((module, imported))
    })
}

/// The modules reachable from `entries`, depth first through what each imports, at most
/// [`MAX_MODULES`]: `visit` reads a module by name and names those it imports.
fn walk_modules<M>(
    entries: Vec<String>,
    mut visit: impl FnMut(&str) -> Option<(M, Vec<String>)>,
) -> Vec<M> {
    let mut seen: HashSet<String> = entries.iter().cloned().collect();
    let mut pending = entries;
    let mut modules = Vec::new();
    while let Some(name) = pending.pop() {
        if modules.len() >= MAX_MODULES {
            tracing::warn!(limit = MAX_MODULES, "route scan stopped: too many modules");
            break;
        }
        let Some((module, imported)) = visit(&name) else {
            continue;
        };
        pending.extend(
            imported
                .into_iter()
                .filter(|name| seen.insert(name.clone())),
        );
        modules.push(module);
    }
    modules
}

/// A source file's text, if it is a regular file of at most [`MAX_FILE_BYTES`].
fn read_source(file: &Path) -> Option<String> {
    let metadata = fs::metadata(file).ok()?;
    if !metadata.is_file() || metadata.len() > MAX_FILE_BYTES {
        return None;
    }
    Some(String::from_utf8_lossy(&fs::read(file).ok()?).into_owned())
}

/// Reads a module's file under `root` (the process's root) and `base`, if it is there.
fn read_module(root: &Path, base: &Path, name: &str) -> Option<Module> {
    let relative = name.replace('.', "/");
    let base = root.join(base.strip_prefix("/").unwrap_or(base));
    [
        (base.join(format!("{relative}.py")), false),
        (base.join(&relative).join("__init__.py"), true),
    ]
    .into_iter()
    .find_map(|(file, is_package)| {
        Some(Module {
            name: name.to_owned(),
            is_package,
            source: read_source(&file)?,
        })
    })
}

/// The application's modules: the entries and what they import from the same directories
/// (libraries live elsewhere and are not read).
fn python_modules(root: &Path, entries: &[(PathBuf, String)]) -> Vec<Module> {
    let bases: Vec<&Path> = entries.iter().map(|(base, _)| base.as_path()).collect();
    let names = entries.iter().map(|(_, name)| name.clone()).collect();
    walk_modules(names, |name| {
        let module = bases
            .iter()
            .find_map(|base| read_module(root, base, name))?;
        // `a.b.c` needs its packages `a` and `a.b` too (their __init__ may register routes).
        let parents = name.match_indices('.').map(|(at, _)| name[..at].to_owned());
        let imported = python::imported_modules(&module).into_iter().chain(parents);
        Some((module, imported.collect()))
    })
}

/// A Django project's urlconfs, the root first: `ROOT_URLCONF` of the settings module (from
/// the environment, else the default `manage.py` or `wsgi.py` sets), then what it includes.
fn django_modules(
    root: &Path,
    entries: &[(PathBuf, String)],
    settings: Option<String>,
) -> Vec<Module> {
    let bases: Vec<&Path> = entries.iter().map(|(base, _)| base.as_path()).collect();
    let read = |name: &str| bases.iter().find_map(|base| read_module(root, base, name));
    let settings = settings.or_else(|| {
        entries
            .iter()
            .filter_map(|(_, name)| read(name))
            .find_map(|module| django::default_settings_module(&module))
    });
    let Some(root_urlconf) = settings
        .and_then(|settings| read(&settings))
        .and_then(|settings| django::assigned_string(&settings, "ROOT_URLCONF"))
    else {
        return Vec::new();
    };
    let mut pending = vec![root_urlconf.clone()];
    let mut seen: HashSet<String> = pending.iter().cloned().collect();
    let mut modules = Vec::new();
    while let Some(name) = pending.pop() {
        if modules.len() >= MAX_MODULES {
            break;
        }
        let Some(module) = read(&name) else {
            continue;
        };
        for included in django::included_modules(&module) {
            if seen.insert(included.clone()) {
                pending.push(included);
            }
        }
        modules.push(module);
    }
    // The root first, whatever order the includes were read in.
    modules.sort_by_key(|module| module.name != root_urlconf);
    modules
}

fn environment_variable(pid: u32, key: &str) -> Option<String> {
    let environ = fs::read(format!("/proc/{pid}/environ")).ok()?;
    environ.split(|byte| *byte == 0).find_map(|entry| {
        let entry = String::from_utf8_lossy(entry);
        let (name, value) = entry.split_once('=')?;
        (name == key).then(|| value.to_owned())
    })
}

/// The templates declared in the process's source, for the frameworks that have a scanner;
/// an empty table for the others. Declarations that cannot be resolved statically are logged
/// once, here.
pub fn scan_process(pid: u32, sdk_type: SdkType, args: &[String]) -> RouteTable {
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let Ok(cwd) = fs::read_link(format!("/proc/{pid}/cwd")) else {
        return RouteTable::default();
    };
    let (modules, scanned) = match sdk_type {
        SdkType::PythonFlask | SdkType::PythonFastApi => {
            let flask_app = environment_variable(pid, "FLASK_APP");
            let entries = python_entries(args, flask_app.as_deref(), &cwd);
            let modules = python_modules(&root, &entries);
            (modules.len(), python::scan(&modules))
        }
        SdkType::PythonDjango => {
            let entries = python_entries(args, None, &cwd);
            let settings = environment_variable(pid, "DJANGO_SETTINGS_MODULE");
            let modules = django_modules(&root, &entries, settings);
            let root_urlconf = modules.first().map(|module| module.name.clone());
            let scanned = root_urlconf
                .map_or_else(Scanned::default, |urlconf| django::scan(&modules, &urlconf));
            (modules.len(), scanned)
        }
        SdkType::JsExpress => {
            let modules = javascript_modules(&root, args, &cwd);
            (modules.len(), javascript::scan(&modules))
        }
        _ => return RouteTable::default(),
    };
    let mut templates = Vec::new();
    let parsed = (scanned.templates.iter().map(|text| Template::parse(text))).chain(
        scanned
            .regex_templates
            .iter()
            .map(|text| Template::regex(text)),
    );
    for template in parsed {
        match template {
            Ok(template) => templates.push(template),
            Err(error) => tracing::warn!(pid, %error, "route template skipped"),
        }
    }
    if !scanned.unresolved.is_empty() {
        tracing::warn!(
            pid,
            unresolved = ?scanned.unresolved,
            "some routes cannot be resolved from the source without running it; --routes FILE can name them"
        );
    }
    tracing::info!(
        pid,
        modules,
        templates = templates.len(),
        "route templates read from the application source"
    );
    RouteTable::new(templates)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn entries_come_from_scripts_app_targets_and_flask_app() {
        let cwd = Path::new("/srv");
        assert_eq!(
            python_entries(&args("python3 app/main.py --port 80"), None, cwd),
            vec![(PathBuf::from("/srv/app"), "main".to_owned())]
        );
        assert_eq!(
            python_entries(
                &args("gunicorn -w 2 -b 0.0.0.0:80 shop.wsgi:app"),
                None,
                cwd
            ),
            vec![(PathBuf::from("/srv"), "shop.wsgi".to_owned())]
        );
        assert_eq!(
            python_entries(
                &args("flask --app api run"),
                Some("other:create_app()"),
                cwd
            ),
            vec![
                (PathBuf::from("/srv"), "api".to_owned()),
                (PathBuf::from("/srv"), "other".to_owned())
            ]
        );
    }

    #[test]
    fn modules_are_followed_through_imports_within_the_application() {
        let root = std::env::temp_dir().join(format!("routes-scan-{}", std::process::id()));
        let app = root.join("srv/app");
        fs::create_dir_all(app.join("shop")).unwrap();
        fs::write(
            app.join("main.py"),
            "import flask, requests\nfrom shop.users import bp\napp = flask.Flask(__name__)\napp.register_blueprint(bp, url_prefix='/api')\n",
        )
        .unwrap();
        fs::write(app.join("shop/__init__.py"), "").unwrap();
        fs::write(
            app.join("shop/users.py"),
            "from flask import Blueprint\nbp = Blueprint('users', __name__)\n@bp.get('/users/<int:uid>')\ndef user(uid):\n    return ''\n",
        )
        .unwrap();
        let entries = vec![(PathBuf::from("/srv/app"), "main".to_owned())];
        let modules = python_modules(&root, &entries);
        let mut names: Vec<&str> = modules.iter().map(|module| module.name.as_str()).collect();
        names.sort();
        assert_eq!(names, vec!["main", "shop", "shop.users"]);
        assert_eq!(
            python::scan(&modules).templates,
            vec!["/api/users/<int:uid>"]
        );
        fs::remove_dir_all(&root).unwrap();
    }
}
