//! Open descriptors through the kernel: an inode is a file, not a name. What ext4 does with a
//! descriptor whose name is unlinked or replaced, the mount must do too.

mod common;
mod mnt;

use common::ServerProc;
use mnt::{sh, Api, Mount};
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;

fn setup() -> (ServerProc, Api, Mount, String) {
    let server = ServerProc::start(&[]);
    let api = Api::new(&server);
    let ns = api.create_ns("files");
    let mount = Mount::start(&server, &["--write-delay", "100ms"]);
    (server, api, mount, ns)
}

#[test]
fn a_reader_keeps_the_file_it_opened_when_another_replaces_the_name() {
    let (_server, api, mut mount, ns) = setup();
    let f = mount.p("files/f");
    let t = mount.p("files/t");
    fs::write(&f, b"0123456789abcdefghijklmnopqrst").unwrap();
    fs::write(&t, b"012").unwrap();
    mount.flush();

    let reader = fs::File::open(&f).unwrap();
    fs::rename(&t, &f).unwrap();

    // The descriptor still shows the 30-byte file it opened, as on ext4.
    let meta = reader.metadata().unwrap();
    assert_eq!(meta.len(), 30);
    let mut buf = [0u8; 30];
    reader.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"0123456789abcdefghijklmnopqrst");
    // The name leads to the new file.
    assert_eq!(fs::read(&f).unwrap(), b"012");
    drop(reader);

    assert_eq!(mount.unmount().code(), Some(0), "{}", mount.log_text());
    assert_eq!(api.get(&ns, "f").as_deref(), Some(&b"012"[..]));
    assert_eq!(api.get(&ns, "t"), None);
}

#[test]
fn an_unlinked_file_stays_readable_and_writable_while_open_and_is_never_uploaded() {
    let (_server, api, mut mount, ns) = setup();
    let f = mount.p("files/kept");
    fs::write(&f, b"old bytes").unwrap();
    mount.flush();

    // exec 3<f; rm f; cat <&3
    let out = sh(&format!(
        "cd {dir} && exec 3<kept && rm kept && cat <&3",
        dir = mount.p("files").display()
    ));
    assert_eq!(out, "old bytes");
    assert_eq!(
        fs::metadata(&f).unwrap_err().raw_os_error(),
        Some(libc::ENOENT)
    );

    // tempfile.TemporaryFile: create, unlink, then use the descriptor.
    let tmp = mount.p("files/scratch");
    let mut file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&tmp)
        .unwrap();
    fs::remove_file(&tmp).unwrap();
    file.write_all(b"scratch data that never reaches KV")
        .unwrap();
    assert_eq!(file.metadata().unwrap().len(), 34);
    file.set_len(7).unwrap(); // ftruncate
    assert_eq!(file.metadata().unwrap().len(), 7);
    file.seek(SeekFrom::Start(0)).unwrap();
    let mut back = String::new();
    file.read_to_string(&mut back).unwrap();
    assert_eq!(back, "scratch");
    file.sync_all().unwrap();
    drop(file);

    assert_eq!(mount.unmount().code(), Some(0), "{}", mount.log_text());
    assert_eq!(api.keys(&ns), Vec::<String>::new());
    assert_eq!(
        api.stat("put_value") + api.stat("bulk_write"),
        1,
        "only the first write of `kept` is uploaded"
    );
}

#[test]
fn a_writer_replaced_by_rename_uploads_nothing_for_its_old_inode() {
    let (_server, api, mut mount, ns) = setup();
    let f = mount.p("files/doc");
    let mut writer = fs::File::create(&f).unwrap();
    writer.write_all(b"draft").unwrap();
    fs::write(mount.p("files/new"), b"final").unwrap();
    fs::rename(mount.p("files/new"), &f).unwrap();
    // The writer's inode lost its name: its bytes stay its own.
    writer.write_all(b" more").unwrap();
    assert_eq!(writer.metadata().unwrap().len(), 10);
    drop(writer);

    assert_eq!(mount.unmount().code(), Some(0), "{}", mount.log_text());
    assert_eq!(api.get(&ns, "doc").as_deref(), Some(&b"final"[..]));
    assert_eq!(api.keys(&ns), vec!["doc".to_string()]);
}

#[test]
fn inodes_the_kernel_forgets_are_freed() {
    let (_server, api, mount, ns) = setup();
    for i in 0..300 {
        api.put(&ns, &format!("d/k{i:03}"), b"v");
    }
    // Listing alone makes no inode per key (readdir's numbers come from the names), except
    // for the first chunk: the kernel asks for it with attributes (READDIRPLUS, one page of
    // at most 25 entries), in case the reader goes on to stat what it lists.
    sh(&format!(
        "ls -f {} > /dev/null",
        mount.p("files/d").display()
    ));
    let listed = mount.status()["inodes"].as_u64().unwrap();
    assert!(listed < 40, "{listed} inodes after ls -f of 300 keys");
    sh(&format!(
        "ls -l {} > /dev/null",
        mount.p("files/d").display()
    ));
    let seen = mount.status()["inodes"].as_u64().unwrap();
    assert!(seen >= 300, "{seen} inodes after ls -l of 300 keys");

    // Drops the kernel's dentries and inodes: it sends FORGET for each.
    fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let left = mount.status()["inodes"].as_u64().unwrap();
        if left < 20 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{left} inodes still held after the kernel forgot them"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // Forgotten inodes come back on the next lookup.
    assert_eq!(fs::read(mount.p("files/d/k123")).unwrap(), b"v");
}
