use super::*;

fn image(files: Vec<IsoFile>) -> IsoImage {
    IsoImage {
        volume_id: "cidata".into(),
        recorded: 1_700_000_000,
        files,
    }
}

fn seed() -> IsoImage {
    image(vec![
        IsoFile::new("user-data", b"#cloud-config\n".to_vec()),
        IsoFile::new("meta-data", b"instance-id: a\n".to_vec()),
    ])
}

fn u32_le(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

#[test]
fn descriptors_carry_label_size_and_joliet_escape() {
    let bytes = seed().to_bytes().unwrap();
    assert_eq!(bytes.len() % SECTOR, 0);
    let pvd = &bytes[16 * SECTOR..17 * SECTOR];
    assert_eq!(&pvd[..7], b"\x01CD001\x01");
    assert_eq!(&pvd[40..72], format!("{:32}", "cidata").as_bytes());
    assert_eq!(u32_le(pvd, 80) as usize * SECTOR, bytes.len());
    let svd = &bytes[17 * SECTOR..18 * SECTOR];
    assert_eq!(&svd[..7], b"\x02CD001\x01");
    assert_eq!(&svd[88..91], b"%/E");
    assert_eq!(&svd[40..52], b"\0c\0i\0d\0a\0t\0a");
    assert_eq!(bytes[18 * SECTOR], 255);
    // The file contents sit at the extents the records give.
    let text = b"#cloud-config\n";
    let at = bytes.windows(text.len()).position(|w| w == text).unwrap();
    assert_eq!(at % SECTOR, 0);
}

#[test]
fn same_inputs_give_the_same_bytes() {
    assert_eq!(seed().to_bytes().unwrap(), seed().to_bytes().unwrap());
    let mut later = seed();
    later.recorded += 1;
    assert_ne!(later.to_bytes().unwrap(), seed().to_bytes().unwrap());
}

#[test]
fn many_files_spill_the_directory_over_sectors() {
    let files = (0..MAX_FILES)
        .map(|i| IsoFile::new(&format!("file-number-{i:03}"), vec![i as u8; i * 100]))
        .collect();
    let bytes = image(files).to_bytes().unwrap();
    for i in [0usize, 31, 63] {
        let data = vec![i as u8; i * 100];
        if !data.is_empty() {
            assert!(bytes.windows(data.len()).any(|w| w == data.as_slice()));
        }
    }
    let mut too_many = image(Vec::new());
    too_many.files = (0..=MAX_FILES)
        .map(|i| IsoFile::new(&format!("f{i}"), Vec::new()))
        .collect();
    assert!(matches!(
        too_many.to_bytes(),
        Err(IsoError::TooManyFiles { .. })
    ));
}

#[test]
fn hostile_names_and_labels_are_refused_by_name() {
    for bad in [
        "",
        ".",
        "..",
        "a/b",
        "a b",
        "x;1",
        "caf\u{e9}",
        &"n".repeat(65),
    ] {
        let err = image(vec![IsoFile::new(bad, Vec::new())])
            .to_bytes()
            .unwrap_err();
        assert!(matches!(err, IsoError::Name { .. }), "{bad:?}: {err}");
        assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
    }
    for bad in ["", "has space", "seventeen-chars-x"] {
        let mut img = seed();
        img.volume_id = bad.into();
        assert!(
            matches!(img.to_bytes(), Err(IsoError::VolumeId { .. })),
            "{bad:?}"
        );
    }
}

#[test]
fn a_name_given_twice_names_both_inputs() {
    let mut a = IsoFile::new("user-data", Vec::new());
    a.origin = "/tmp/one".into();
    let mut b = IsoFile::new("user-data", Vec::new());
    b.origin = "/tmp/two".into();
    let err = image(vec![a, b]).to_bytes().unwrap_err().to_string();
    assert!(
        err.contains("/tmp/one") && err.contains("/tmp/two"),
        "{err}"
    );
}

#[test]
fn names_that_share_an_8_3_name_get_distinct_ones() {
    let img = image(vec![
        IsoFile::new("user-data", b"one".to_vec()),
        IsoFile::new("user-data2", b"two".to_vec()),
    ]);
    let bytes = img.to_bytes().unwrap();
    let has = |s: &[u8]| bytes.windows(s.len()).any(|w| w == s);
    assert!(has(b"USER_DAT.;1") && has(b"USER_DA0.;1"));
}

#[test]
fn inputs_over_the_limit_are_refused_without_reading_them_all() {
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big");
    let file = std::fs::File::create(&big).unwrap();
    file.set_len(MAX_FILE_SIZE + 1).unwrap();
    let err = IsoFile::read("user-data", &big).unwrap_err();
    assert!(matches!(err, IsoError::TooLarge { .. }), "{err}");
    assert!(err.to_string().contains("big"), "{err}");
    let endless = std::io::repeat(0);
    let err = IsoFile::read_from("user-data", endless, "stdin").unwrap_err();
    assert!(err.to_string().starts_with("stdin: "), "{err}");
}

#[test]
fn failed_writes_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let into_dir = dir.path().join("seed.iso");
    std::fs::create_dir(&into_dir).unwrap();
    assert!(seed().write(&into_dir).is_err());
    assert!(into_dir.is_dir());
    let mut bad = seed();
    bad.volume_id = String::new();
    let out = dir.path().join("out.iso");
    assert!(bad.write(&out).is_err());
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("seed.iso")]);
    seed().write(&out).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), seed().to_bytes().unwrap());
}
