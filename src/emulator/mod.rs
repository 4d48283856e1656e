//! A local APNs: validates requests as Apple documents them and answers as Apple does.
